"""Raw rows to untokenized preference pairs, one parser per source format.

Every reader yields one JSON text per input row; `parse_record` turns it into a dict (or a `Drop`), for the pairs
and eval stages alike. A parser takes that row and its source's config (`SourceSection`) and returns the pairs the
row yields as `RawPair`s, or raises `Drop` with a reason that ends up in the manifest's drop counts.
Prompts and completions are either plain strings (used as they are) or chat messages (they get the tokenizer's
chat template in the pairs stage).
"""
import json
import random
import re
from dataclasses import dataclass

from pipeline.config import SourceSection

Messages = list[dict[str, str]]


class Drop(Exception):
    """A row (or a pair) that cannot be used; `reason` is a short key counted in the manifest."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def parse_record(record: str, read_error: str) -> dict:
    """One input row as a reader yields it (a JSON text, or the reader's own error as "reason: detail") -> the row
    as a dict; raises Drop."""
    if read_error:
        raise Drop(*read_error.split(": ", 1))
    try:
        row = json.loads(record)
    except json.JSONDecodeError as e:
        raise Drop("malformed_row", f"{e}: {record[:200]}") from None
    if not isinstance(row, dict):
        raise Drop("malformed_row", f"not a JSON object: {record[:200]}")
    return row


@dataclass
class RawPair:
    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages


def _field(row: dict, name: str, fields: dict[str, str]):
    """Read a field by its format name, through the source's `fields` renaming; missing and empty are drops."""
    column = fields.get(name, name)
    value = row.get(column)
    if value is None:
        raise Drop("missing_field", f"no field {column!r}")
    if value == "" or value == []:
        raise Drop("empty_field", f"field {column!r} is empty")
    return value


# Roles chat templates know; another one would be rendered however the template happens to treat it (most print
# it as is, some drop the turn), so it is a drop rather than a guess.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def _messages(value, column: str) -> Messages:
    """Accept a list of {role, content} dicts (or one such dict); anything else is `bad_messages`, and a role
    outside CHAT_ROLES is `unknown_role`."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        raise Drop("bad_messages", f"field {column!r} is neither a string nor a list of {{role, content}} messages")
    unknown = sorted({m["role"] for m in value} - set(CHAT_ROLES))
    if unknown:
        raise Drop("unknown_role", f"field {column!r} has role(s) {', '.join(map(repr, unknown))}; chat roles are "
                                   f"{', '.join(CHAT_ROLES)}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _as_chat(value, role: str, column: str) -> Messages:
    return [{"role": role, "content": value}] if isinstance(value, str) else _messages(value, column)


def parse_pairwise(row: dict, source: SourceSection) -> list[RawPair]:
    """prompt, chosen, rejected. All strings: plain text. Any of them messages: all become chat messages (a string
    prompt is a user turn, a string completion an assistant turn)."""
    fields = source.fields
    prompt, chosen, rejected = (_field(row, name, fields) for name in ("prompt", "chosen", "rejected"))
    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, (str, list, dict)):
            raise Drop("bad_type", f"field {fields.get(name, name)!r} is a {type(value).__name__}")
    if all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        return [RawPair(prompt, chosen, rejected)]
    return [
        RawPair(
            _as_chat(prompt, "user", fields.get("prompt", "prompt")),
            _as_chat(chosen, "assistant", fields.get("chosen", "chosen")),
            _as_chat(rejected, "assistant", fields.get("rejected", "rejected")),
        )
    ]


HH_ASSISTANT = "\n\nAssistant:"


def _split_last_assistant_text(text: str) -> tuple[str, str]:
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise Drop("no_assistant_turn", f"no {HH_ASSISTANT.strip()!r} turn")
    cut += len(HH_ASSISTANT)
    return text[:cut], text[cut:]


def _split_last_assistant_messages(messages: Messages) -> tuple[Messages, Messages]:
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise Drop("no_assistant_turn", "no assistant message")
    return messages[:last], messages[last:]


def parse_implicit_prompt(row: dict, source: SourceSection) -> list[RawPair]:
    """chosen and rejected hold whole conversations (HH-RLHF text with "\\n\\nAssistant:" turns, or message lists);
    the prompt is what precedes the last assistant turn, and must be the same in both."""
    fields = source.fields
    chosen, rejected = _field(row, "chosen", fields), _field(row, "rejected", fields)
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt, chosen_part = _split_last_assistant_text(chosen)
        rejected_prompt, rejected_part = _split_last_assistant_text(rejected)
    else:
        chosen = _messages(chosen, fields.get("chosen", "chosen"))
        rejected = _messages(rejected, fields.get("rejected", "rejected"))
        prompt, chosen_part = _split_last_assistant_messages(chosen)
        rejected_prompt, rejected_part = _split_last_assistant_messages(rejected)
    if prompt != rejected_prompt:
        raise Drop("no_shared_prefix", "chosen and rejected differ before their last assistant turn")
    if not prompt:
        raise Drop("empty_field", "nothing before the last assistant turn")
    return [RawPair(prompt, chosen_part, rejected_part)]


def _question_pairs(question: str, right: str, wrongs: list[str], source: SourceSection, default_template: str):
    """A question and its right and wrong answers as pairs, in plain text or as chat turns."""
    prompt = (source.prompt_template or default_template).format(question=question)
    if source.chat:
        user = [{"role": "user", "content": prompt}]
        return [RawPair(user, [{"role": "assistant", "content": right}], [{"role": "assistant", "content": wrong}])
                for wrong in wrongs]
    return [RawPair(prompt, " " + right, " " + wrong) for wrong in wrongs]


QA_TEMPLATE = "Question: {question}\nAnswer:"
ARC_INSTRUCTION = re.compile(
    r"^Please choose the correct answer to the question: (?P<question>.*?)\n\n(?P<choices>Answer1: .*?)"
    r"\n\nAnswer format:", re.DOTALL)


def multiple_choice_fields(row: dict, fields: dict[str, str]) -> tuple[str, list[str], object, list, str]:
    """(question, choices, answer, labels, default template) from any of the known layouts, by their keys."""
    if "instruction" in row and "answer" in row:  # ARC in LLM-Adapters' instruction form
        match = ARC_INSTRUCTION.match(row["instruction"] or "")
        if not match:
            raise Drop("unparsed_question", "instruction is not in the 'Please choose the correct answer' form")
        choices = re.split(r"\s*Answer\d+: ", " " + match["choices"])[1:]
        labels = [f"answer{i + 1}" for i in range(len(choices))]
        return match["question"].strip(), [c.strip() for c in choices], row["answer"], labels, QA_TEMPLATE
    if "answerKey" in row and isinstance(row.get("choices"), dict):  # Hugging Face ai2_arc
        return row["question"], row["choices"].get("text") or [], row["answerKey"], row["choices"].get("label"), \
            QA_TEMPLATE
    if "endings" in row and "ctx" in row:  # HellaSwag (Hugging Face, or the text layout's reader)
        context = f"{row['activity_label']}: {row['ctx']}" if row.get("activity_label") else row["ctx"]
        return context, row["endings"], row["label"], None, "{question}"
    question = _field(row, "question", fields)
    choices = _field(row, "choices", fields)
    answer = row.get(fields.get("answer", "answer"))
    if answer is None or answer == "":
        raise Drop("missing_field", f"no field {fields.get('answer', 'answer')!r}")
    labels = row.get(fields["labels"]) if "labels" in fields else None
    return question, choices, answer, labels, QA_TEMPLATE


def answer_index(answer, choices: list[str], labels: list | None) -> int:
    """The right choice from a label (A, answer2), the choice's own text, or an index (0-based, or a digit string)."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        index = answer
    elif isinstance(answer, str) and labels and answer.strip() in [str(label) for label in labels]:
        index = [str(label) for label in labels].index(answer.strip())
    elif isinstance(answer, str) and answer in choices:  # before digits: "4" among choices "3", "4", "5" is text
        index = choices.index(answer)
    elif isinstance(answer, str) and answer.strip().isdigit():
        index = int(answer.strip())
    else:
        raise Drop("bad_answer", f"answer {answer!r} names no choice")
    if not 0 <= index < len(choices):
        raise Drop("bad_answer", f"answer {answer!r} is outside the {len(choices)} choices")
    return index


def parse_multiple_choice(row: dict, source: SourceSection) -> list[RawPair]:
    """One pair per wrong choice: (question, right choice, wrong choice). Reads ARC (LLM-Adapters' instruction
    JSON and Hugging Face ai2_arc), HellaSwag (Hugging Face, and the six-line text layout), and any other dataset
    through `fields` naming its question, choices and answer (an index, a label, or the right choice's text)."""
    question, choices, answer, labels, template = multiple_choice_fields(row, source.fields)
    if not isinstance(question, str) or not question.strip():
        raise Drop("empty_field", "empty question")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices) or len(choices) < 2:
        raise Drop("too_few_choices", f"need two or more text choices, got {choices!r}"[:200])
    right = answer_index(answer, choices, labels)
    wrongs = [choice for i, choice in enumerate(choices) if i != right]
    return _question_pairs(question.strip(), choices[right].strip(), [w.strip() for w in wrongs], source, template)


# A number as written in a solution: 1,234.5 or 42 (a leading minus is left to the text as an operator).
NUMBER = re.compile(r"(?<![\d.,])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])")
CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations: <<48/2=24>>
FINAL_MARKERS = ("####", "The answer is:")


def _changed_number(text: str, rng: random.Random) -> str:
    """The same number shifted by 1 to 10 either way, never to itself or below zero, in the same format."""
    decimals = len(text.split(".")[1]) if "." in text else 0
    value = float(text.replace(",", ""))
    step = rng.randint(1, 10) * rng.choice([-1, 1])
    if value + step < 0:
        step = -step
    new = value + step
    formatted = f"{new:,.{decimals}f}" if "," in text else f"{new:.{decimals}f}"
    return formatted


def corrupt_solution(solution: str, rng: random.Random) -> tuple[str, str, str]:
    """Change one number of a worked solution: a computed intermediate result (a number right after '=') or the
    final answer, picked by `rng`. The new value also replaces every later occurrence of the same number, as a
    solver carrying the wrong result forward would; earlier occurrences and the arithmetic after it are left as
    they are. Returns (rejected solution, old number, new number)."""
    numbers = list(NUMBER.finditer(solution))
    marker = max(solution.rfind(m) for m in FINAL_MARKERS)
    results = [m for m in numbers if re.search(r"=\s*\$?\s*$", solution[:m.start()]) or m.start() > marker]
    candidates = results or numbers
    target = rng.choice(candidates)
    new = _changed_number(target.group(), rng)
    pieces, last = [], 0
    for m in numbers:
        if m.start() >= target.start() and m.group() == target.group():
            pieces += [solution[last:m.start()], new]
            last = m.end()
    pieces.append(solution[last:])
    return "".join(pieces), target.group(), new


def parse_math_corruption(row: dict, source: SourceSection) -> list[RawPair]:
    """A problem and its worked solution (GSM8K: question/answer ending '#### N'; MetaMathQA: query/response ending
    'The answer is: N') give `corruptions` rejected solutions, each with one number changed (`corrupt_solution`).
    Calculator annotations (<<48/2=24>>) are removed first: they would restate the true value."""
    fields = source.fields
    question = row.get(fields.get("question", "question"), row.get("query"))
    solution = row.get(fields.get("solution", "answer"), row.get("response"))
    if not isinstance(question, str) or not question.strip():
        raise Drop("missing_field", "no question (or query) text")
    if not isinstance(solution, str) or not solution.strip():
        raise Drop("missing_field", "no worked solution (answer or response) text")
    solution = CALCULATOR.sub("", solution).strip()
    if not any(m in solution for m in FINAL_MARKERS):
        raise Drop("no_final_answer", "the solution has no '####' or 'The answer is:' final answer")
    if not NUMBER.search(solution):
        raise Drop("no_numbers", "the solution has no number to change")
    # Seeded by the problem itself: the same pairs for the same seed, in any order or batching.
    rng = random.Random(f"{source.seed}\x00{question}\x00{solution}")
    rejected = []
    for _ in range(source.corruptions * 10):  # a few retries in case two draws give the same text
        text, _, _ = corrupt_solution(solution, rng)
        if text not in rejected:
            rejected.append(text)
        if len(rejected) == source.corruptions:
            break
    return _question_pairs(question.strip(), solution, rejected, source, QA_TEMPLATE)


PARSERS = {
    "pairwise": parse_pairwise,
    "implicit_prompt": parse_implicit_prompt,
    "multiple_choice": parse_multiple_choice,
    "math_corruption": parse_math_corruption,
}
