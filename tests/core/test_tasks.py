"""Task-type detection: accuracy on the labelled prompts, message handling, robustness."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config.model import TASK_TYPES, TaskType
from proxy.core.tasks import (
    MAX_LAST_USER_CHARS,
    detect_task,
    detect_task_text,
    guess_task,
    message_text,
    score_task,
)

PROMPTS_FILE = Path(__file__).resolve().parents[1] / "data" / "task_prompts.jsonl"
MIN_ACCURACY_ALL = 0.90
MIN_ACCURACY_HELDOUT = 0.85
MIN_PROMPTS = 240
MIN_PER_CLASS = 55
SPLITS = ("dev", "heldout")

Message = Mapping[str, object]


@dataclass(frozen=True)
class Labelled:
    messages: list[Message]
    label: TaskType
    split: str
    shown: str  # for failure messages


def _as_task(value: object) -> TaskType:
    for task in TASK_TYPES:
        if value == task:
            return task
    raise ValueError(f"not a task type: {value!r}")


def _load() -> list[Labelled]:
    rows: list[Labelled] = []
    for number, line in enumerate(PROMPTS_FILE.read_text(encoding="utf-8").splitlines(), 1):
        row = json.loads(line)
        if not isinstance(row, dict) or ("text" in row) == ("messages" in row):
            raise ValueError(f"line {number}: needs exactly one of 'text' and 'messages'")
        if "text" in row:
            messages: list[Message] = [{"role": "user", "content": row["text"]}]
        else:
            messages = row["messages"]
        if row.get("split") not in SPLITS:
            raise ValueError(f"line {number}: split must be one of {SPLITS}")
        rows.append(Labelled(messages, _as_task(row.get("label")), row["split"], line[:100]))
    return rows


PROMPTS = _load()


def _report(rows: Sequence[Labelled]) -> tuple[float, str]:
    """Accuracy, and a summary with per-class recall, the confusion matrix and misses."""
    confusion: Counter[tuple[TaskType, TaskType]] = Counter()
    misses: list[str] = []
    for row in rows:
        predicted = detect_task(row.messages)
        confusion[(row.label, predicted)] += 1
        if predicted != row.label:
            misses.append(f"  {row.label} -> {predicted}: {row.shown}")
    correct = sum(confusion[(task, task)] for task in TASK_TYPES)
    accuracy = correct / len(rows)
    lines = [f"accuracy {accuracy:.3f} ({correct}/{len(rows)})", "recall:"]
    for task in TASK_TYPES:
        total = sum(confusion[(task, other)] for other in TASK_TYPES)
        row_counts = " ".join(f"{other}={confusion[(task, other)]}" for other in TASK_TYPES)
        lines.append(f"  {task:9} {confusion[(task, task)] / total:.2f}  ({row_counts})")
    return accuracy, "\n".join([*lines, "misclassified:", *misses])


def test_labelled_set_is_large_balanced_and_split() -> None:
    counts = Counter(row.label for row in PROMPTS)
    assert len(PROMPTS) >= MIN_PROMPTS
    assert min(counts[task] for task in TASK_TYPES) >= MIN_PER_CLASS, counts
    for split in SPLITS:
        in_split = Counter(row.label for row in PROMPTS if row.split == split)
        assert min(in_split[task] for task in TASK_TYPES) >= MIN_PER_CLASS // 2, (split, in_split)


def test_accuracy_on_the_whole_labelled_set() -> None:
    accuracy, summary = _report(PROMPTS)
    assert accuracy >= MIN_ACCURACY_ALL, summary


def test_accuracy_on_the_held_out_half() -> None:
    accuracy, summary = _report([row for row in PROMPTS if row.split == "heldout"])
    assert accuracy >= MIN_ACCURACY_HELDOUT, summary


# --- message handling ---------------------------------------------------------------------


def user(content: object) -> Message:
    return {"role": "user", "content": content}


def test_content_parts_use_text_and_skip_images() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    parts = [image, {"type": "text", "text": "Write a haiku about rain"}]
    assert message_text(parts) == "Write a haiku about rain"
    assert detect_task([user(parts)]) == "creative"
    assert detect_task([user([image])]) == "chat"


def test_malformed_parts_are_skipped() -> None:
    parts: list[object] = [
        "stray string",
        {"type": "text"},
        {"type": "text", "text": 42},
        {"text": "no type"},
        {"type": "text", "text": "implement quicksort in Rust"},
    ]
    assert message_text(parts) == "implement quicksort in Rust"
    assert detect_task([user(parts)]) == "coding"


def test_system_prompt_is_considered() -> None:
    follow_up = user("and the next one: items = load(path); items.sort(key=len)")
    assert detect_task([follow_up]) == "coding"
    vague = user("Do the next one too, please.")
    assert detect_task([vague]) == "chat"
    system = {"role": "system", "content": "You are a Python developer. Reply with code only."}
    assert detect_task([system, vague]) == "coding"
    developer = {"role": "developer", "content": "You write poems and short stories."}
    assert detect_task([developer, vague]) == "creative"


def test_system_prompt_does_not_outweigh_the_user() -> None:
    system = {"role": "system", "content": "You are CodeBot, an expert programming assistant."}
    assert detect_task([system, user("thanks, have a great weekend!")]) == "chat"


def test_multi_turn_follows_the_last_user_message() -> None:
    poem = user("Write a poem about the sea.")
    code = user("Now write a Python function that reverses a linked list.")
    reply = {"role": "assistant", "content": "Waves fold over waves..."}
    assert detect_task([poem, reply, code]) == "coding"
    assert detect_task([code, reply, poem]) == "creative"


def test_earlier_turns_carry_a_vague_follow_up() -> None:
    first = user("Write a limerick about my cat Felix.")
    reply = {"role": "assistant", "content": "There once was a cat..."}
    assert detect_task([first, reply, user("shorter please, and funnier")]) == "creative"


def test_tool_messages_and_tool_calls_do_not_make_it_coding() -> None:
    messages: list[Message] = [
        user("What's the weather in Paris?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp_c": 18, "sky": "clear"}'},
        user("great, thanks!"),
    ]
    assert detect_task(messages) == "chat"


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [user("")],
        [user(None)],
        [user(42)],
        [user({"text": "a dict is not a content"})],
        [{"role": "user"}],
        [{"role": None, "content": "Write a poem"}],
        ["not a message", 7, None],
        [{"role": "assistant", "content": "def f(): pass"}],
    ],
)
def test_empty_or_odd_messages_are_chat(messages: list[Message]) -> None:
    assert detect_task(messages) == "chat"


def test_non_sequence_messages_are_chat() -> None:
    not_a_list: object = {"role": "user", "content": "implement quicksort"}
    assert detect_task(not_a_list) == "chat"  # type: ignore[arg-type]
    assert detect_task("implement quicksort") == "chat"  # type: ignore[arg-type]


def test_only_the_tail_of_a_long_prompt_is_read() -> None:
    code = "```python\ndef f(x):\n    return x.strip()\n```\n"
    tail = "The quick brown fox jumps over the lazy dog. " * 100 + "Write a poem about autumn."
    assert len(tail) >= MAX_LAST_USER_CHARS
    assert score_task(code + tail) == score_task(tail)
    assert detect_task_text(code + tail) == "creative"
    # within reach, the same code does count
    assert score_task(code + tail[-200:])["coding"] > score_task(tail)["coding"]


def test_scores_and_guess_agree() -> None:
    scores = score_task("Compare the pros and cons of renting versus buying.")
    assert set(scores) == set(TASK_TYPES)
    assert max(scores, key=scores.__getitem__) == "analysis"
    guess = guess_task([user("Compare the pros and cons of renting versus buying.")])
    assert guess.task == "analysis"
    assert dict(guess.scores) == pytest.approx(scores, abs=1e-3)
    assert guess.margin > 0


def test_ties_go_to_chat() -> None:
    guess = guess_task([])
    assert guess.task == "chat"
    assert guess.scores["chat"] > 0
    assert guess.scores["coding"] == guess.scores["analysis"] == guess.scores["creative"] == 0


# --- robustness -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
parts = st.lists(
    st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=200)}),
        st.fixed_dictionaries({"type": st.sampled_from(["image_url", "text"]), "x": json_values}),
        json_values,
    ),
    max_size=4,
)
contents = st.one_of(st.text(max_size=300), parts, json_values)
roles = st.one_of(
    st.sampled_from(["user", "system", "developer", "assistant", "tool"]), json_values
)
messages_strategy = st.lists(
    st.one_of(
        st.fixed_dictionaries({"role": roles, "content": contents}),
        st.dictionaries(st.text(max_size=8), json_values, max_size=3),
        json_values,
    ),
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(messages_strategy)
def test_any_message_structure_gives_a_task_type(messages: list[Message]) -> None:
    assert detect_task(messages) in TASK_TYPES


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=600))
def test_any_text_gives_a_task_type_and_matches_the_messages_form(text: str) -> None:
    task = detect_task_text(text)
    assert task in TASK_TYPES
    assert detect_task([user(text)]) == task
