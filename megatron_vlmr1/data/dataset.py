"""VLM-R1 jsonl → prompts: several data files paired with image folders, per-file reward methods, task templates.

This mirrors VLM-R1's ``grpo_jsonl.py`` so that the files its users already have load unchanged:

* files and image folders pair up in order; the CLI form ``a.jsonl:b.jsonl`` with ``d1:d2`` is accepted as well as
  YAML lists; ``image`` paths are relative to the file's image folder (or to the jsonl's own folder when no image
  folders are given);
* the *problem* is the human turn without its ``<image>`` placeholders; the *solution* is the gpt turn with any
  ``<answer>`` tags removed and re-wrapped as ``<answer> ... </answer>``;
* ``accu_reward_method`` comes from the file's entry in ``reward_methods`` (default ``"default"``; ``"iou"`` for
  VLM-R1's REC ``.json`` / data ``.yaml`` files, which ``grpo_rec.py`` scores by IoU) unless the line carries its
  own; every name is checked against the ``accuracy`` reward's methods when the data is loaded;
* besides jsonl, ``files`` may name VLM-R1's REC recipe format — a ``.json`` array of ``{image, problem, solution}``
  records or a data ``.yaml`` listing such files (``rec_json.py``);
* the user message holds one image entry per image, then the question wrapped in the task's template
  (``templates.py``); a line's own ``task`` key overrides the configured task;
* every other key of a line (``normal_caption``, ``objects``, ...) is kept as an extra field for rewards.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from megatron_vlmr1.data.iterator import BatchIterator
from megatron_vlmr1.data.messages import ChatMessage, build_messages
from megatron_vlmr1.data.rec_json import read_data_yaml, read_rec_json, sample_rows
from megatron_vlmr1.data.schema import IMAGE_TOKEN, Row, read_jsonl
from megatron_vlmr1.data.templates import format_question, question_template
from megatron_vlmr1.rewards.text import accuracy_methods

# Keys that the loader turns into Sample fields; everything else in a line is an extra field.
RESERVED_KEYS = frozenset({"id", "image", "conversations", "accu_reward_method", "task"})
# Reward field names the loader fills itself; a line's own key of such a name is replaced (with a warning).
REWARD_FIELD_NAMES = frozenset({"solution", "problem", "image_path", "image_sizes", "source"})
REC_JSON_SUFFIXES = (".json", ".yaml", ".yml")  # VLM-R1's REC recipe format (rec_json.py)


def split_paths(entries: list[str]) -> list[str]:
    """Expand VLM-R1's colon-joined form (``a.jsonl:b.jsonl``) inside a list of paths."""
    return [part for entry in entries for part in entry.split(":") if part]


@dataclass
class DataConfig:
    """Where prompts come from and how they are worded. ``files`` pair with ``image_folders`` in order."""

    files: list[str] = field(default_factory=list)  # .jsonl, or VLM-R1 REC .json / data .yaml (rec_json.py)
    image_folders: list[str] = field(default_factory=list)  # empty: each file's own folder
    reward_methods: list[str] = field(default_factory=list)  # per-file accu_reward_method; empty: "default"
    task: str = "default"  # template: default | rec | ovd (= odLength) | ic
    template: str | None = None  # custom question template with {Question}; overrides the task's template
    system_prompt: str | None = None
    max_samples: int | None = None  # keep the first N rows (file order), before shuffling
    shuffle: bool = True
    seed: int = 0
    min_image_side: int = 28  # smaller images are upscaled on load, with a warning at validation
    max_errors: int = 20  # problems listed per file before validation stops
    verify_images: bool = True  # decode every image up front (catches truncated files), not only check existence

    def __post_init__(self) -> None:
        self.files = split_paths(self.files)
        self.image_folders = split_paths(self.image_folders)
        self.reward_methods = split_paths(self.reward_methods)
        if self.image_folders and len(self.image_folders) != len(self.files):
            raise ValueError(f"data.image_folders has {len(self.image_folders)} entries but data.files has "
                             f"{len(self.files)}; they pair up in order")
        if self.reward_methods and len(self.reward_methods) != len(self.files):
            raise ValueError(f"data.reward_methods has {len(self.reward_methods)} entries but data.files has "
                             f"{len(self.files)}; they pair up in order")
        unknown = [m for m in self.reward_methods if m not in accuracy_methods()]
        if unknown:
            raise ValueError(f"data.reward_methods: unknown accu_reward_method(s) {unknown}; known: "
                             f"{accuracy_methods()}")
        try:
            question_template(self.task)
        except ValueError as err:
            raise ValueError(f"data.task: {err}") from None
        if self.template is not None and "{Question}" not in self.template:
            raise ValueError(f"data.template must contain '{{Question}}', got {self.template!r}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"data.max_samples must be >= 1, got {self.max_samples}")
        if self.min_image_side < 1:
            raise ValueError(f"data.min_image_side must be >= 1, got {self.min_image_side}")
        if self.max_errors < 1:
            raise ValueError(f"data.max_errors must be >= 1, got {self.max_errors}")

    def sources(self) -> list[tuple[str, str, str]]:
        """(jsonl file, image folder, reward method) triples."""
        folders = self.image_folders or [str(Path(f).parent) for f in self.files]
        methods = self.reward_methods or ["iou" if f.endswith(REC_JSON_SUFFIXES) else "default" for f in self.files]
        return list(zip(self.files, folders, methods))


@dataclass
class Sample:
    """One prompt, ready for the processor (``messages``) and for the rewards (``reward_fields``)."""

    id: str
    source: str  # "file.jsonl:LINE"
    image_paths: list[str]
    image_sizes: list[tuple[int, int]]  # (width, height) of the original images; boxes are in these pixels
    problem: str
    messages: list[ChatMessage]  # [{"role": ..., "content": [{"type": "image"}, {"type": "text", "text": ...}]}]
    solution: str  # "<answer> ... </answer>"
    task: str
    accu_reward_method: str
    extra: dict[str, Any] = field(default_factory=dict)

    def reward_fields(self) -> dict[str, Any]:
        """Keyword fields a reward receives for this sample (VLM-R1's names where it has them)."""
        return {"solution": self.solution, "accu_reward_method": self.accu_reward_method, "task": self.task,
                "problem": self.problem, "image_path": list(self.image_paths),
                "image_sizes": list(self.image_sizes), "id": self.id, "source": self.source, **self.extra}


def target_image(fields: Mapping[str, Any], num_images: int) -> int:
    """Index of the image a question refers to: the sample's ``target_image`` when it is a valid index, else 0."""
    index = fields.get("target_image", 0)
    valid = isinstance(index, int) and not isinstance(index, bool) and 0 <= index < num_images
    return index if valid else 0


def collate_reward_fields(samples: list[Sample]) -> dict[str, list[Any]]:
    """Column-wise reward fields of a batch: ``fn(completions, **collate_reward_fields(batch))``.

    An extra field missing from some samples is ``None`` for them, so every column has one entry per sample.
    """
    rows = [s.reward_fields() for s in samples]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return {k: [row.get(k) for row in rows] for k in keys}


def solution_text(answer: Any) -> str:
    """VLM-R1's solution form: ``<answer>`` tags stripped, then the answer re-wrapped once."""
    if isinstance(answer, str):
        answer = answer.replace("<answer>", "").replace("</answer>", "").strip()
    return f"<answer> {answer} </answer>"


def row_to_sample(row: Row, cfg: DataConfig, reward_method: str) -> Sample:
    record = row.record
    task = record.get("task", cfg.task)
    template = cfg.template if cfg.template is not None else question_template(task)
    problem = record["conversations"][0]["value"].replace(IMAGE_TOKEN, "").strip()
    return Sample(
        id=str(record.get("id", row.source)),
        source=row.source,
        image_paths=list(row.image_paths),
        image_sizes=list(row.image_sizes),
        problem=problem,
        messages=build_messages(format_question(template, problem), len(row.image_paths), cfg.system_prompt),
        solution=solution_text(record["conversations"][1]["value"]),
        task=task,
        accu_reward_method=record.get("accu_reward_method", reward_method),
        extra={k: v for k, v in record.items() if k not in RESERVED_KEYS | REWARD_FIELD_NAMES},
    )


def read_rows(path: str, folder: str, cfg: DataConfig) -> list[Row]:
    """Validated rows of one ``data.files`` entry: a jsonl file, a VLM-R1 REC ``.json``, or a data ``.yaml``.

    For a YAML, an entry's own ``image_folder`` wins, then the paired ``data.image_folders`` entry (VLM-R1's
    ``--image_root``), then the ``.json`` file's folder.
    """
    checks = dict(min_image_side=cfg.min_image_side, max_errors=cfg.max_errors, verify_images=cfg.verify_images)
    if path.endswith(".json"):
        return read_rec_json(path, folder, **checks)
    if not path.endswith((".yaml", ".yml")):
        return read_jsonl(path, folder, **checks)
    rows = []
    for source in read_data_yaml(path):
        root = source.image_folder or (folder if cfg.image_folders else str(Path(source.json_path).parent))
        rows.extend(sample_rows(read_rec_json(source.json_path, root, **checks), source.sampling_strategy, cfg.seed,
                                source.where))
    return rows


def load_samples(cfg: DataConfig) -> list[Sample]:
    """Validate every file up front (raising one ``ValueError`` per file), then build samples in file order."""
    if not cfg.files:
        raise ValueError("data.files is empty: give at least one jsonl file")
    samples: list[Sample] = []
    for path, folder, method in cfg.sources():
        rows = read_rows(path, folder, cfg)
        samples.extend(row_to_sample(row, cfg, method) for row in rows)
        shadowing = [row.source for row in rows if REWARD_FIELD_NAMES & set(row.record)]
        if shadowing:
            keys = sorted({k for row in rows for k in REWARD_FIELD_NAMES & set(row.record)})
            warnings.warn(f"{path}: key(s) {keys} in {len(shadowing)} line(s) (first {shadowing[0]}) are replaced by "
                          "the loader's own fields of those names, as in VLM-R1", stacklevel=2)
    if not samples:
        raise ValueError(f"no samples in {cfg.files}")
    return samples[:cfg.max_samples] if cfg.max_samples is not None else samples


def prompt_iterator(cfg: DataConfig, batch_size: int, rank: int = 0, world_size: int = 1) -> BatchIterator[Sample]:
    """Load ``cfg``'s samples and batch them for one data-parallel rank (``batch_size`` prompts per rank per step)."""
    return BatchIterator(load_samples(cfg), batch_size, seed=cfg.seed, shuffle=cfg.shuffle, rank=rank,
                         world_size=world_size)
