"""Question templates per task type, worded as VLM-R1's Qwen module words them.

A template wraps the question (the human turn without its ``<image>`` placeholders) at ``{Question}``. Matching
VLM-R1's wording matters: a policy trained there and evaluated here, or the other way round, sees the same prompt.
"""
from __future__ import annotations

_THINK = ("First output the thinking process in <think> </think> tags and then output the final answer in "
          "<answer> </answer> tags.")
_OD_SYSTEM = (
    "First thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think><answer> answer here </answer>"
)

TEMPLATES: dict[str, str] = {
    "default": "{Question} " + _THINK,
    "rec": "{Question} " + _THINK + " Output the final answer in JSON format.",
    "ic": (
        "{Question} First thinks about the reasoning process in the mind and then provides the user with the answer. "
        "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
        "respectively, i.e., <think> reasoning process here </think><answer> json format answer here </answer>"
    ),
    "odLength": _OD_SYSTEM + "\n{Question}",
}
# Other names people use for the same task types.
ALIASES: dict[str, str] = {"ovd": "odLength", "od": "odLength", "r1": "default"}


def known_tasks() -> list[str]:
    return sorted(TEMPLATES) + sorted(ALIASES)


def question_template(task: str) -> str:
    """The template string of a task type (``ovd`` is an alias of VLM-R1's ``odLength``)."""
    name = ALIASES.get(task, task)
    if name not in TEMPLATES:
        raise ValueError(f"unknown task {task!r}; known: {known_tasks()}")
    return TEMPLATES[name]


def format_question(template: str, question: str) -> str:
    """Fill ``{Question}``; plain replacement, so braces elsewhere (JSON examples) need no escaping."""
    if "{Question}" not in template:
        raise ValueError(f"a question template must contain '{{Question}}', got {template!r}")
    return template.replace("{Question}", question)
