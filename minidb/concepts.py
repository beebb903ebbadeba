"""The subjects of a run: one from --images and --class, or several from --concepts concepts.json.

concepts.json is the community's `concepts_list` format, with minidb's names:

    [{"images": "./dog", "class": "dog"},
     {"images": "./cat", "class": "cat", "identifier": "zwx",
      "instance_prompt": "a photo of zwx cat", "class_prompt": "a photo of a cat"}]

Each subject gets its own identifier [V] (a rare token, drawn from the seed unless given; no two
alike), its own instance prompt ("a photo of a [V] CLASS") and class prompt ("a photo of a CLASS").
Subjects of one class prompt share one class prior. A photo's own caption (photo.txt, see
minidb/data.py) replaces the instance prompt for that photo, with "[V]" read as the identifier.
"""

import json
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from minidb.data import MIRRORED, DataError
from minidb.tokenizer import as_read

KEYS = {"images": "a folder", "class": "a class name", "identifier": "a token", "instance_prompt": "a prompt",
        "class_prompt": "a prompt"}


@dataclass
class Subject:
    images: str
    class_name: str
    identifier: str = None
    instance_prompt: str = None
    class_prompt: str = None
    photos: object = None  # minidb.data.Photos, once read

    @property
    def new_scene(self):
        """A context the photos never show: the validation grid's test of recontextualization."""
        return f"a photo of a {self.identifier} {self.class_name} on the beach"

    def describe(self, resolution):
        """The line train.py prints for this subject at the start."""
        n = len(self.photos.pixels)
        captioned = sum(c is not None for c, name in zip(self.photos.captions, self.photos.names)
                        if not name.endswith(MIRRORED))  # --flip: a mirrored copy shares its photo's caption
        own = (" (1 photo uses its own caption)" if captioned == 1 else
               f" ({captioned} photos use their own captions)" if captioned else "")
        return (f"subject: {self.identifier} ({self.class_name}), {n} image{'s' * (n != 1)} at {resolution}px "
                f"from {self.images}, instance prompt {self.instance_prompt!r}{own}, class prompt {self.class_prompt!r}")

    def prompt_of(self, i):
        """The prompt photo i trains with: its own caption, else the instance prompt."""
        caption = self.photos.captions[i]
        return caption.replace("[V]", self.identifier) if caption else self.instance_prompt


class TwiceError(ValueError):
    """A key given twice in one JSON object (json keeps the last, silently)."""


def mentions(text, word):
    """Whether `text` holds `word` as a whole word, in any case: "sks" in "a photo of SKS dog" and in "sks,",
    not in "asks"; "<sks>" after a space. (The tokenizer reads a prompt in lower case.)"""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


def one_value_per_key(pairs):
    keys = [key for key, _ in pairs]
    twice = next((key for k, key in enumerate(keys) if key in keys[:k]), None)
    if twice is not None:
        raise TwiceError(repr(twice))
    return dict(pairs)


def class_dir_problem(class_dir, folders):
    """One sentence if --class-dir is one of the subjects' photo folders, else None: the prior-preservation loss
    would then train the class prompt on a subject, the drift it is there to prevent."""
    if class_dir and any(Path(f).resolve() == Path(class_dir).resolve() for f in folders if f):
        return (f"--class-dir {class_dir} is the folder of a subject's own photos, so the prior-preservation loss "
                "would teach the class prompt that subject, the drift it is there to prevent; give photos of others "
                "of its class, or leave --class-dir out to draw them.")
    return None


def placeholder_problem(identifier, what):
    """One sentence if an identifier holds [V], the docs' placeholder for it (copied from an example prompt),
    which captions and prompts read as the identifier: as a token it is only "[", "v" and "]"."""
    if identifier and "[v]" in identifier.lower():
        return (f"{what} {identifier} holds [V], the placeholder that prompts and captions read as the identifier; "
                "give a rare word such as sks, or leave it out to have one picked.")
    return None


def read_subjects(args):
    """[Subject] from the command line: --concepts FILE, or --images with --class (and the prompt flags)."""
    if args.concepts is None:
        return [Subject(args.images, args.class_name, args.identifier, args.instance_prompt, args.class_prompt)]
    path = Path(args.concepts)
    try:
        concepts = json.loads(path.read_text(encoding="utf-8-sig"),  # -sig: Notepad's byte-order mark is no error
                              object_pairs_hook=one_value_per_key)
    except OSError as e:
        raise DataError(f"--concepts {path} cannot be read ({e.strerror or e.__class__.__name__}); "
                        "check the path.") from None
    except UnicodeDecodeError:
        raise DataError(f"--concepts {path} is not UTF-8 text; save it as UTF-8.") from None
    except TwiceError as e:
        raise DataError(f"--concepts {path} gives {e} twice in one entry, and only the last would count; keep one.") \
            from None
    except ValueError as e:
        empty = not getattr(e, "doc", "?").strip()  # (a JSONDecodeError keeps the text it read)
        what = "is empty" if empty else f"is not valid JSON ({e})"
        raise DataError(f"--concepts {path} {what}; it must be a list of "
                        '{"images": ..., "class": ...} objects.') from None
    except RecursionError:  # '[' * 100000: json gives up; a real concepts list is never nested that deep
        raise DataError(f"--concepts {path} is not a valid concepts list (it is nested too deeply to read); it must "
                        'be a list of {"images": ..., "class": ...} objects.') from None
    if not isinstance(concepts, list) or not concepts:
        raise DataError(f'--concepts {path} must hold a non-empty list of {{"images": ..., "class": ...}} objects.')
    subjects = []
    for k, concept in enumerate(concepts, 1):
        if not isinstance(concept, dict):
            raise DataError(f"--concepts {path}: entry {k} is a {type(concept).__name__}, not an object with "
                            '"images" and "class".')
        unknown = sorted(set(concept) - set(KEYS))
        if unknown:
            raise DataError(f"--concepts {path}: entry {k} has the unknown key {unknown[0]!r}; the keys are "
                            f"{', '.join(KEYS)}.")
        for key, what in KEYS.items():
            value = concept.get(key)
            if (key in ("images", "class") and value is None) or (value is not None and (
                    not isinstance(value, str) or not value.strip())):
                raise DataError(f"--concepts {path}: entry {k} needs \"{key}\" as {what} (a non-empty string), "
                                f"not {value!r}.")
        folder = Path(concept["images"]).expanduser()
        if not folder.is_absolute():  # relative to the file, as a user who keeps them together expects
            folder = path.parent / folder
        if not folder.is_dir():
            relative = "" if Path(concept["images"]).expanduser().is_absolute() else \
                f" (a relative folder is read from the file's own folder, {path.parent})"
            raise DataError(f"--concepts {path}: entry {k}'s \"images\" folder {folder} "
                            f"{'is a file' if folder.exists() else 'does not exist'}{relative}; check it.")
        problem = placeholder_problem(concept.get("identifier"), f'--concepts {path}: entry {k}\'s "identifier"')
        if problem:
            raise DataError(problem)
        subjects.append(Subject(str(folder), concept["class"], concept.get("identifier"),
                                concept.get("instance_prompt"), concept.get("class_prompt")))
    problem = class_dir_problem(getattr(args, "class_dir", None), [s.images for s in subjects])
    if problem:
        raise DataError(problem)
    folders = [Path(s.images).resolve() for s in subjects]
    for k, folder in enumerate(folders):
        if folder in folders[:k]:  # most likely an entry copied and not edited
            warnings.warn(f"--concepts {path}: entries {folders.index(folder) + 1} and {k + 1} both train on the "
                          f"photos in {subjects[k].images}, so their identifiers will name the same subject; give "
                          "each entry its own folder if that is not what you meant.")
    return subjects


DRAWS = 10_000  # draws for an identifier no subject has yet: with one token left of SD's thousands, all but certain


def name_subjects(subjects, tokenizer, pick, seed, prior=True, taken=()):
    """Give every subject its identifier and prompts; a problem comes back as one sentence. `prior`: the run
    trains with a prior loss (--prior-weight above 0). `taken`: identifiers the base model already learned (a
    model train.py made records them), which no pick reuses: the new subject would share the old one's word.
    (One given is used as given: training the same subject further is a reason to.)"""
    given = [s.identifier.strip().lower() for s in subjects if s.identifier]  # as prompts read it: SKS is sks
    twice = sorted({i for i in given if given.count(i) > 1})
    if twice:
        return f"two subjects use the identifier {twice[0]}; give each subject its own."
    rng, used = random.Random(seed), set(given) | {word.lower() for word in taken}
    for subject in subjects:
        for _ in range(0 if subject.identifier else DRAWS):  # the first pick: the one a single-subject run made
            word = pick(tokenizer, rng)
            if word not in used:
                subject.identifier = word
                used.add(word)
                break
        if not subject.identifier:  # every rare token is taken (a small vocabulary, hundreds of subjects)
            return (f"the {len(subjects)} subjects need more identifiers than the {len(used)} rare tokens this model's "
                    "vocabulary offers; give the others their own \"identifier\", or train fewer subjects in one run.")
        given = subject.instance_prompt
        article = re.match(r"(a|an|the)\s+(.+)", subject.class_name.strip(), re.IGNORECASE)
        if article and not (given and subject.class_prompt):  # a prompt made from it says "a photo of a a cup"
            warnings.warn(f"The class {subject.class_name!r} starts with {article[1]!r}, and the prompts made from it "
                          f"add their own ('a photo of a {subject.class_name}'); give the noun alone, e.g. "
                          f"{article[2]!r}.")
        subject.instance_prompt = (given or f"a photo of a [V] {subject.class_name}").replace(
            "[V]", subject.identifier)  # [V] stands for the identifier, as in captions and validation prompts
        subject.class_prompt = subject.class_prompt or f"a photo of a {subject.class_name}"
        if "[V]" in subject.class_prompt and prior:  # no identifier there: the prior is the class without the subject
            warnings.warn(f"The class prompt {subject.class_prompt!r} holds [V], which only instance prompts, captions "
                          "and validation prompts read as the identifier, so the prior draws and trains it as those "
                          f"letters; describe the class alone, e.g. 'a photo of a {subject.class_name}'.")
        classes = [(k, s.class_prompt or f"a photo of a {s.class_name}") for k, s in enumerate(subjects, 1)]
        clash = next(((k, p) for k, p in classes if mentions(p, subject.identifier)), None)
        if clash and prior:  # the prior loss would hold the identifier to what the class prompt means
            warnings.warn(f"The identifier {subject.identifier} is also a word of the class prompt {clash[1]!r}"
                          + (f" (subject {clash[0]})" if len(subjects) > 1 else "") + ", so the prior loss trains it "
                          "back toward any such picture; choose a rare word, or leave the identifier out.")
        if not mentions(subject.instance_prompt, subject.identifier):
            against = " and the prior loss pulls against it" if prior else ""
            warnings.warn(f"The instance prompt {given!r} does not name the identifier {subject.identifier}, so the "
                          f"subject is learned under its other words{against}; write [V] where the identifier goes, "
                          f"e.g. 'a photo of a [V] {subject.class_name}'.")
    read_alike = {}  # "Dog" and "dog": the model reads them as one prompt, so one prior serves both
    for subject in subjects:
        subject.class_prompt = read_alike.setdefault(as_read(subject.class_prompt), subject.class_prompt)
    return None
