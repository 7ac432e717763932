"""Synthetic REC / OVD data: coloured shapes at known positions, written in VLM-R1's jsonl format.

No data sets can be downloaded on CI machines, so every data-dependent test and the CPU demo use images drawn here.
Each object's box is read back from the exact pixel mask it was drawn with, so a box is ground truth by
construction, not by geometry.

Pixel convention (the same as COCO and VLM-R1's IoU): a box ``[x1, y1, x2, y2]`` is in absolute pixels of the
original image, in pixel-edge coordinates: pixel column ``i`` covers ``[i, i + 1)``, so the shape covers columns
``x1 .. x2 - 1`` and rows ``y1 .. y2 - 1``, and ``(x2 - x1) * (y2 - y1)`` is the box area. Image sides are multiples
of 28 (112 to 224 px) so Qwen-VL processors keep the original size and predicted boxes need no rescaling.

Splits: ``train`` and ``test`` only ever draw in-domain colour x shape combinations; ``test_ood`` asks about
combinations listed in ``HELD_OUT`` (every colour and every shape still occurs in training, only the pairing is new),
for out-of-domain evaluation.

Difficulties: ``normal`` (one to four shapes of any size anywhere on 112-224 px canvases, half of them noisy, half
of the REC expressions relational), ``easy`` (one or two 44 px shapes in the quadrants of a 112 px canvas) and
``locate`` (the CPU demo's task: one 56 px shape filling one quadrant of a 112 px canvas, i.e. exactly 2 x 2 of
Qwen-VL's merged 28 px image tokens, over a background whose red and green channels are the pixel's x and y; the
shape is drawn in the blue channel only, so the image tokens it covers carry their own position in their colour).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

Combo = tuple[str, str]  # (colour, shape)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
# Pairings asked about only in test_ood; every colour and every shape still occurs in training in other pairings.
HELD_OUT: frozenset[Combo] = frozenset({
    ("red", "triangle"), ("green", "circle"), ("blue", "square"),
    ("yellow", "cross"), ("purple", "diamond"), ("orange", "circle"),
})
EASY_COLORS: tuple[str, ...] = ("red", "green", "blue")
EASY_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIDES: tuple[int, ...] = (112, 140, 168, 196, 224)
SPLITS: tuple[str, ...] = ("train", "test", "test_ood")
ORDINALS: tuple[str, ...] = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
GAP = 3  # minimum free pixels between two objects' boxes, so a box never contains a piece of another object

REC_QUESTION = "Please provide the bounding box coordinate of the region this sentence describes: {expr}."
OVD_QUESTION = (
    "Please carefully check the image and detect the following objects: {labels}. "
    "Output the bbox coordinates of detected objects in <answer></answer>. "
    "The bbox coordinates in Markdown format should be:\n"
    "```json\n"
    '[{{"bbox_2d": [x1, y1, x2, y2], "label": "object name"}}]\n'
    "```\n"
    'If no targets are detected in the image, simply respond with "None".'
)

Difficulty = Literal["normal", "easy", "locate"]
DIFFICULTIES: tuple[str, ...] = ("normal", "easy", "locate")
LOCATE_SIDE, LOCATE_SIZE = 112, 56  # canvas and shape: 4 x 4 and 2 x 2 merged 28 px image tokens of Qwen-VL


@dataclass(frozen=True)
class Obj:
    """One object: attributes, the square it is drawn in, and its exact pixel box (x2, y2 exclusive)."""

    color: str
    shape: str
    square: tuple[int, int, int]  # x, y, size
    box: tuple[int, int, int, int]

    @property
    def label(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    objects: tuple[Obj, ...]
    noisy: bool
    background: int
    noise_seed: int
    coded: bool = False  # ``locate``: red = x and green = y of the background, shapes drawn in blue only


def split_combos(difficulty: Difficulty) -> tuple[list[Combo], list[Combo]]:
    """(in-domain, held-out) colour x shape combinations of a difficulty; both are non-empty."""
    if difficulty == "locate":
        colors, shapes = ("blue",), EASY_SHAPES  # every shape is drawn in the blue channel
    elif difficulty == "easy":
        colors, shapes = EASY_COLORS, EASY_SHAPES
    else:
        colors, shapes = tuple(COLORS), SHAPES
    every = [(c, s) for c in colors for s in shapes]
    inside = [cs for cs in every if cs not in HELD_OUT]
    held = [cs for cs in every if cs in HELD_OUT]
    assert inside and held, "each difficulty needs in-domain and held-out combinations"
    return inside, held


def shape_mask(shape: str, width: int, height: int, square: tuple[int, int, int]) -> np.ndarray:
    """Boolean mask ``[height, width]`` of ``shape`` drawn inside ``square = (x, y, size)``."""
    x, y, size = square
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    x2, y2 = x + size - 1, y + size - 1  # PIL's shape corners are inclusive
    mid_x, mid_y = x + size // 2, y + size // 2
    if shape == "circle":
        draw.ellipse((x, y, x2, y2), fill=255)
    elif shape == "square":
        draw.rectangle((x, y, x2, y2), fill=255)
    elif shape == "triangle":
        draw.polygon([(mid_x, y), (x2, y2), (x, y2)], fill=255)
    elif shape == "diamond":
        draw.polygon([(mid_x, y), (x2, mid_y), (mid_x, y2), (x, mid_y)], fill=255)
    elif shape == "cross":
        arm = max(size // 3, 2)
        draw.rectangle((mid_x - arm // 2, y, mid_x - arm // 2 + arm - 1, y2), fill=255)
        draw.rectangle((x, mid_y - arm // 2, x2, mid_y - arm // 2 + arm - 1), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {list(SHAPES)}")
    return np.asarray(canvas) > 0


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _apart(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """Two squares ``(x, y, size)`` keep at least ``GAP`` free pixels between them."""
    ax, ay, asz = a
    bx, by, bsz = b
    return ax + asz + GAP <= bx or bx + bsz + GAP <= ax or ay + asz + GAP <= by or by + bsz + GAP <= ay


def _place(rng: random.Random, width: int, height: int, sizes: list[int]) -> list[tuple[int, int, int]] | None:
    """Non-touching squares of the given sizes at random positions; None when they do not fit quickly."""
    squares: list[tuple[int, int, int]] = []
    for size in sizes:
        for _ in range(100):
            square = (rng.randrange(2, width - size - 1), rng.randrange(2, height - size - 1), size)
            if all(_apart(square, other) for other in squares):
                squares.append(square)
                break
        else:
            return None
    return squares


def make_scene(rng: random.Random, combos: list[Combo], difficulty: Difficulty) -> Scene | None:
    """One object per entry of ``combos`` on a random canvas; None when they do not fit (the caller redraws)."""
    coded = False
    if difficulty == "locate":
        # Four positions (the quadrants), no margin: a shape covers whole image tokens and nothing else.
        width = height = LOCATE_SIDE
        far = LOCATE_SIDE - LOCATE_SIZE
        corners = rng.sample([(0, 0), (far, 0), (0, far), (far, far)], len(combos))
        squares = [(x, y, LOCATE_SIZE) for x, y in corners]
        noisy, background, coded = False, 0, True
    elif difficulty == "easy":
        # Few positions: each shape fills one quadrant of a 112 px canvas, so an image has at most 4 distinct boxes.
        width = height = 112
        corners = rng.sample([(6, 6), (62, 6), (6, 62), (62, 62)], len(combos))
        squares = [(x, y, 44) for x, y in corners]
        noisy, background = False, 235
    else:
        width, height = rng.choice(SIDES), rng.choice(SIDES)
        sizes = [rng.randrange(18, min(width, height) // 3) for _ in combos]
        squares = _place(rng, width, height, sizes)
        noisy, background = rng.random() < 0.5, rng.randrange(200, 246)
    if squares is None:
        return None
    objects = tuple(Obj(color, shape, square, _mask_box(shape_mask(shape, width, height, square)))
                    for (color, shape), square in zip(combos, squares))
    return Scene(width, height, objects, noisy, background, rng.randrange(2**32), coded)


def _coded_background(width: int, height: int) -> np.ndarray:
    """``locate``'s background ``[height, width, 3]``: red rises with x, green with y (20..200), blue is 0."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, :, 0] = np.round(20 + 180 * np.arange(width) / max(width - 1, 1)).astype(np.uint8)[None, :]
    pixels[:, :, 1] = np.round(20 + 180 * np.arange(height) / max(height - 1, 1)).astype(np.uint8)[:, None]
    return pixels


def render(scene: Scene) -> Image.Image:
    """RGB image of a scene. Background noise is grey (r = g = b), so it never equals a shape colour.

    A coded scene (``locate``) keeps the position-coded red and green under its shapes and sets their blue to 255.
    """
    if scene.coded:
        pixels = _coded_background(scene.width, scene.height)
        for obj in scene.objects:
            pixels[shape_mask(obj.shape, scene.width, scene.height, obj.square), 2] = 255
        return Image.fromarray(pixels, "RGB")
    grey = np.full((scene.height, scene.width), scene.background, dtype=np.int16)
    if scene.noisy:
        noise = np.random.default_rng(scene.noise_seed).integers(-12, 13, size=grey.shape, dtype=np.int16)
        grey = grey + noise
    pixels = np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    for obj in scene.objects:
        pixels[shape_mask(obj.shape, scene.width, scene.height, obj.square)] = COLORS[obj.color]
    return Image.fromarray(pixels, "RGB")


def relation_holds(a: tuple[int, int, int, int], relation: str, b: tuple[int, int, int, int]) -> bool:
    """Whether box ``a`` is entirely ``relation`` box ``b`` (no overlap on that axis, so no judgement call)."""
    if relation == "left of":
        return a[2] <= b[0]
    if relation == "right of":
        return a[0] >= b[2]
    if relation == "above":
        return a[3] <= b[1]
    if relation == "below":
        return a[1] >= b[3]
    raise ValueError(f"unknown relation {relation!r}; known: {list(RELATIONS)}")


def _others(rng: random.Random, pool: list[Combo], exclude: set[Combo], k: int) -> list[Combo]:
    choices = [cs for cs in pool if cs not in exclude]
    return [rng.choice(choices) for _ in range(k)]


def _rec_relational(rng: random.Random, target: Combo, pool: list[Combo]) -> tuple[Scene, int, str] | None:
    """A scene with two objects like the target, referred to through a relation to a unique anchor."""
    anchor = rng.choice([cs for cs in pool if cs != target])
    extra = _others(rng, pool, {target, anchor}, rng.randrange(0, 2))
    scene = make_scene(rng, [target, target, anchor, *extra], "normal")
    if scene is None:
        return None
    twins, anchor_box = scene.objects[:2], scene.objects[2].box
    for relation in rng.sample(RELATIONS, len(RELATIONS)):
        for index in rng.sample([0, 1], 2):
            # True for the target and false for its twin: the phrase is both correct and unambiguous.
            if relation_holds(twins[index].box, relation, anchor_box) and \
                    not relation_holds(twins[1 - index].box, relation, anchor_box):
                expr = f"the {' '.join(target)} {relation} the {' '.join(anchor)}"
                return scene, index, expr
    return None


def _rec_image(rng: random.Random, target: Combo, pool: list[Combo],
               difficulty: Difficulty) -> tuple[Scene, int, str]:
    """The referred image: (scene, index of the target object, referring expression)."""
    while True:
        if difficulty == "normal" and rng.random() < 0.5:
            found = _rec_relational(rng, target, pool)
            if found is not None:
                return found
            continue
        if difficulty == "locate":
            k = 0
        else:
            k = rng.randrange(0, 2) if difficulty == "easy" else rng.randrange(1, 4)
        scene = make_scene(rng, [target, *_others(rng, pool, {target}, k)], difficulty)
        if scene is not None:
            return scene, 0, f"the {' '.join(target)}"


def _filler_image(rng: random.Random, pool: list[Combo], difficulty: Difficulty) -> Scene:
    """An image that is not asked about (multi-image samples)."""
    while True:
        k = rng.randrange(1, 3) if difficulty in ("easy", "locate") else rng.randrange(1, 4)
        scene = make_scene(rng, _others(rng, pool, set(), k), difficulty)
        if scene is not None:
            return scene


def _ovd_image(rng: random.Random, queryable: list[Combo], pool: list[Combo],
               difficulty: Difficulty) -> tuple[Scene, list[str]]:
    """The asked-about image and its label query: labels of present objects (all instances), maybe absent ones."""
    while True:
        first = rng.choice(queryable)
        k = rng.randrange(0, 2) if difficulty in ("easy", "locate") else rng.randrange(1, 5)
        # Repeat the first combination sometimes so a label can have several instances.
        rest = [first if rng.random() < 0.3 else rng.choice(pool) for _ in range(k)]
        scene = make_scene(rng, [first, *rest], difficulty)
        if scene is not None:
            break
    present = sorted({(o.color, o.shape) for o in scene.objects} & set(queryable))
    absent = sorted(set(queryable) - set(present))
    if absent and rng.random() < 0.1:
        queried: list[Combo] = []
    else:
        queried = rng.sample(present, rng.randrange(1, min(3, len(present)) + 1))
    if absent and (not queried or rng.random() < 0.3):
        queried.append(rng.choice(absent))
    rng.shuffle(queried)
    return scene, [" ".join(cs) for cs in queried]


def _objects_field(scenes: list[Scene]) -> list[list[dict]]:
    return [[{"label": o.label, "bbox_2d": list(o.box)} for o in s.objects] for s in scenes]


def _prefix(k: int, target_image: int) -> str:
    return f"In the {ORDINALS[target_image]} image, " if k > 1 else ""


def _ask(prefix: str, question: str) -> str:
    return prefix + (question[0].lower() + question[1:] if prefix else question)


def _write_images(scenes: list[Scene], out_dir: Path, rel_stem: str) -> list[str]:
    paths = []
    for j, scene in enumerate(scenes):
        rel = f"{rel_stem}_{j}.png" if len(scenes) > 1 else f"{rel_stem}.png"
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        render(scene).save(out_dir / rel, format="PNG")
        paths.append(rel)
    return paths


def _split_pools(split: str, difficulty: Difficulty) -> tuple[list[Combo], list[Combo]]:
    """(combinations that may be asked about, combinations that may appear at all) for a split."""
    inside, held = split_combos(difficulty)
    if split == "test_ood":
        return held, inside + held
    return inside, inside


def rec_record(rng: random.Random, split: str, index: int, out_dir: Path, images_per_sample: int,
               difficulty: Difficulty) -> dict:
    """One REC jsonl record (images written under ``out_dir/images/<split>/``)."""
    queryable, pool = _split_pools(split, difficulty)
    target_image = rng.randrange(images_per_sample)
    scene, target_index, expr = _rec_image(rng, rng.choice(queryable), pool, difficulty)
    scenes = [scene if j == target_image else _filler_image(rng, pool, difficulty) for j in range(images_per_sample)]
    sample_id = f"rec_{split}_{index:06d}"
    paths = _write_images(scenes, out_dir, f"images/{split}/{sample_id}")
    question = _ask(_prefix(images_per_sample, target_image), REC_QUESTION.format(expr=expr))
    return {
        "id": sample_id,
        "image": paths[0] if images_per_sample == 1 else paths,
        "conversations": [
            {"from": "human", "value": "<image>" * images_per_sample + question},
            {"from": "gpt", "value": json.dumps(list(scene.objects[target_index].box))},
        ],
        "task": "rec",
        "accu_reward_method": "iou",
        "target_image": target_image,
        "expression": expr,
        "objects": _objects_field(scenes),
    }


def ovd_record(rng: random.Random, split: str, index: int, out_dir: Path, images_per_sample: int,
               difficulty: Difficulty) -> tuple[dict, Scene]:
    """One OVD jsonl record and its asked-about scene.

    The answer lists every box of every queried label, or ``None`` when none of them is present (VLM-R1's OVD form).
    """
    queryable, pool = _split_pools(split, difficulty)
    target_image = rng.randrange(images_per_sample)
    scene, labels = _ovd_image(rng, queryable, pool, difficulty)
    scenes = [scene if j == target_image else _filler_image(rng, pool, difficulty) for j in range(images_per_sample)]
    sample_id = f"ovd_{split}_{index:06d}"
    paths = _write_images(scenes, out_dir, f"images/{split}/{sample_id}")
    boxes = [{"bbox_2d": list(o.box), "label": label} for label in labels
             for o in sorted(scene.objects, key=lambda o: o.box) if o.label == label]
    answer = "None" if not boxes else "```json\n" + json.dumps(boxes) + "\n```"
    question = _ask(_prefix(images_per_sample, target_image), OVD_QUESTION.format(labels=labels))
    caption = ", ".join(o.label for o in scene.objects)
    return {
        "id": sample_id,
        "image": paths[0] if images_per_sample == 1 else paths,
        "conversations": [
            {"from": "human", "value": "<image>" * images_per_sample + question},
            {"from": "gpt", "value": f"<answer>{answer}</answer>"},
        ],
        "task": "ovd",
        "accu_reward_method": "map_len",
        "target_image": target_image,
        "labels": labels,
        "normal_caption": f"{len(scene.objects)} shapes on a grey background: {caption}",
        "coco_image_id": index,
        "objects": _objects_field(scenes),
    }, scene


def coco_ground_truth(records: list[tuple[dict, Scene]], difficulty: Difficulty) -> dict:
    """COCO detection ground truth of OVD records: one image per record, boxes of the queried labels only.

    Only queried labels are annotated because a detector asked for some labels is not expected to find others.
    COCO boxes are ``[x, y, width, height]`` in the same pixel-edge convention as ``bbox_2d``.
    """
    inside, held = split_combos(difficulty)
    names = sorted(" ".join(cs) for cs in inside + held)
    category = {name: i + 1 for i, name in enumerate(names)}
    images, annotations = [], []
    for record, scene in records:
        paths = record["image"] if isinstance(record["image"], list) else [record["image"]]
        images.append({"id": record["coco_image_id"], "file_name": paths[record["target_image"]],
                       "width": scene.width, "height": scene.height})
        for obj in sorted(scene.objects, key=lambda o: o.box):
            if obj.label not in record["labels"]:
                continue
            x1, y1, x2, y2 = obj.box
            annotations.append({
                "id": len(annotations) + 1, "image_id": record["coco_image_id"],
                "category_id": category[obj.label], "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
            })
    return {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": name} for name, i in category.items()]}


def make_dataset(task: Literal["rec", "ovd"], out_dir: str | Path, n: int, seed: int = 0, *,
                 n_test: int | None = None, images_per_sample: int = 1,
                 difficulty: Difficulty = "normal") -> dict[str, Path]:
    """Write ``<split>.jsonl`` for ``train`` (n records), ``test`` and ``test_ood`` (n_test each), images under
    ``out_dir/images/`` and, for OVD, ``<split>_coco.json``. Paths in the jsonl are relative to ``out_dir`` (the
    image folder to pair them with). Same arguments give byte-identical files. Returns split -> jsonl path.
    """
    if task not in ("rec", "ovd"):
        raise ValueError(f"task must be 'rec' or 'ovd', got {task!r}")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {list(DIFFICULTIES)}, got {difficulty!r}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not 1 <= images_per_sample <= len(ORDINALS):
        raise ValueError(f"images_per_sample must be in 1..{len(ORDINALS)}, got {images_per_sample}")
    n_test = max(1, n // 5) if n_test is None else n_test
    if n_test < 0:
        raise ValueError(f"n_test must be >= 0, got {n_test}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for split in SPLITS:
        # String seeds hash with SHA-512 in ``random``, independent of PYTHONHASHSEED: stable across runs.
        rng = random.Random(f"{seed}/{task}/{difficulty}/{images_per_sample}/{split}")
        count = n if split == "train" else n_test
        if task == "rec":
            records = [rec_record(rng, split, i, out_dir, images_per_sample, difficulty) for i in range(count)]
        else:
            pairs = [ovd_record(rng, split, i, out_dir, images_per_sample, difficulty) for i in range(count)]
            records = [record for record, _ in pairs]
            coco = coco_ground_truth(pairs, difficulty)
            (out_dir / f"{split}_coco.json").write_text(json.dumps(coco) + "\n")
        path = out_dir / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        written[split] = path
    return written


def make_rec_dataset(out_dir: str | Path, n: int, seed: int = 0, **kwargs) -> dict[str, Path]:
    """REC splits; see ``make_dataset`` for the keyword arguments."""
    return make_dataset("rec", out_dir, n, seed, **kwargs)


def make_ovd_dataset(out_dir: str | Path, n: int, seed: int = 0, **kwargs) -> dict[str, Path]:
    """OVD splits with COCO ground truth; see ``make_dataset`` for the keyword arguments."""
    return make_dataset("ovd", out_dir, n, seed, **kwargs)
