"""The toy world: a lab beside minidb's Stable Diffusion and DreamBooth, not part of them.

world.py draws a small procedural world of captioned pictures and the subject; probe.py is the small
network that reads those pictures and computes the paper's metrics; lab.py (`python -m minidb.toy.lab`)
trains the toy base model and the probe on that world and runs the paper's experiments in it.
"""
