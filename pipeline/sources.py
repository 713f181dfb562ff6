"""Raw rows to untokenized preference pairs, one parser per source format.

A parser takes one input row (a dict) and returns the pairs it yields as `RawPair`s, or raises `Drop` with a
reason that ends up in the manifest's drop counts. Prompts and completions are either plain strings (used as they
are) or chat messages (they get the tokenizer's chat template in the pairs stage).
"""
from dataclasses import dataclass

Messages = list[dict[str, str]]


class Drop(Exception):
    """A row (or a pair) that cannot be used; `reason` is a short key counted in the manifest."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


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


def _messages(value, column: str) -> Messages:
    """Accept a list of {role, content} dicts (or one such dict); anything else is `bad_messages`."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        raise Drop("bad_messages", f"field {column!r} is neither a string nor a list of {{role, content}} messages")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _as_chat(value, role: str, column: str) -> Messages:
    return [{"role": role, "content": value}] if isinstance(value, str) else _messages(value, column)


def parse_pairwise(row: dict, fields: dict[str, str]) -> list[RawPair]:
    """prompt, chosen, rejected. All strings: plain text. Any of them messages: all become chat messages (a string
    prompt is a user turn, a string completion an assistant turn)."""
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


def parse_implicit_prompt(row: dict, fields: dict[str, str]) -> list[RawPair]:
    """chosen and rejected hold whole conversations (HH-RLHF text with "\\n\\nAssistant:" turns, or message lists);
    the prompt is what precedes the last assistant turn, and must be the same in both."""
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


PARSERS = {
    "pairwise": parse_pairwise,
    "implicit_prompt": parse_implicit_prompt,
}
