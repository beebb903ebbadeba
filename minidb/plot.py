"""The run's loss curve, loss.png: each step's instance and prior loss, their moving averages, and
the drift score at each validation beside the frozen base model's. Drawn with PIL alone: minidb has
no plotting dependency."""

import math

from PIL import Image, ImageDraw

from minidb.writes import atomic_write


def ema(values, span):
    """Exponential moving average with weight 2 / (span + 1) per new value, bias-corrected so that
    the first points are not pulled towards zero (as Adam corrects its moments)."""
    alpha, avg, norm, out = 2 / (span + 1), 0.0, 0.0, []
    for v in values:
        avg, norm = (1 - alpha) * avg + alpha * v, (1 - alpha) * norm + alpha
        out.append(avg / norm)
    return out


def nice_ticks(low, high, n=5):
    """About n round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    raw = max(high - low, 1e-12) / n
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


SERIES = {"instance loss": ("instance_loss", (200, 60, 40)), "prior loss": ("prior_loss", (40, 90, 200))}
DRIFT_COLOR = (30, 140, 60)


def plot_losses(rows, path, size=(800, 400)):
    """The loss curve: faint raw per-step values and their moving average, one colour for the
    subject (instance) loss and one for the prior loss, whose rise is the drift to watch.
    (PIL only: no plotting dependency.) Raw values above the 98th percentile are drawn at the top
    edge, so that a few spikes do not flatten the curves."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 60, 30, size[0] - 20, size[1] - 40  # the plot area
    values = sorted(r[k] for r in rows for k in [key for key, _ in SERIES.values()] + ["drift", "drift_base"]
                    if r.get(k) is not None)
    if rows and values:
        y_max = values[min(len(values) - 1, int(0.98 * len(values)))] * 1.05 or 1.0
        steps = [r["step"] for r in rows]
        x_lo, x_hi = steps[0], max(steps[-1], steps[0] + 1)
        x = lambda step: left + (right - left) * (step - x_lo) / (x_hi - x_lo)
        y = lambda v: bottom - (bottom - top) * min(v, y_max) / y_max
        for tick in nice_ticks(0, y_max):
            draw.line([(left, y(tick)), (right, y(tick))], fill=(235, 235, 235))
            draw.text((left - 8, y(tick)), f"{tick:.3g}", fill="black", anchor="rm")
        for tick in nice_ticks(x_lo, x_hi):
            draw.line([(x(tick), bottom), (x(tick), bottom + 4)], fill="black")
            draw.text((x(tick), bottom + 6), f"{tick:g}", fill="black", anchor="ma")
        draw.text(((left + right) / 2, size[1] - 4), "step", fill="black", anchor="md")
        draw.text((4, top - 20), "loss", fill="black")
        span = max(2, len(rows) // 12)  # about 8% of the run: smooth, yet it follows a trend
        legend_x = left + 10
        for label, (key, color) in SERIES.items():
            points = [(x(r["step"]), r[key]) for r in rows if r.get(key) is not None]
            if not points:
                continue
            faint = tuple(c + (255 - c) // 2 for c in color)
            for px, v in points:
                draw.rectangle([px - 0.5, y(v) - 0.5, px + 0.5, y(v) + 0.5], fill=faint)
            smooth = [(px, y(v)) for (px, _), v in zip(points, ema([v for _, v in points], span))]
            if len(smooth) > 1:
                draw.line(smooth, fill=color, width=2)
            draw.text((legend_x, top - 20), label, fill=color)
            legend_x += draw.textlength(label) + 20
        draw.text((right, size[1] - 4), f"dots: each step; lines: average of ~{span} steps", fill="gray", anchor="rd")
        # the drift score at each validation (train.py), and the frozen base model's as a dashed line
        drift = [(x(r["step"]), y(r["drift"])) for r in rows if r.get("drift") is not None]
        base = next((r["drift_base"] for r in rows if r.get("drift_base") is not None), None)
        if base is not None:
            for px in range(left, right, 12):
                draw.line([(px, y(base)), (min(px + 6, right), y(base))], fill=DRIFT_COLOR)
        for px, py in drift:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=DRIFT_COLOR)
        if len(drift) > 1:
            draw.line(drift, fill=DRIFT_COLOR, width=2)
        if drift:
            draw.text((legend_x, top - 20), "drift (held-out prior loss; dashed: base model)", fill=DRIFT_COLOR)
        draw.rectangle([left, top, right, bottom], outline="black")
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
