"""Final answers, read one way everywhere: the eval stage's GSM8K exact match and the verifier that labels the
policy's own samples in online rounds (math and multiple choice). The math rules are lm-evaluation-harness's gsm8k
filters."""
import re

STRICT_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_ANSWER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# A multiple-choice answer: '#### B' as the math solutions end, else a completion that opens with the letter alone
# (' B', ' (B) since', ' B. the text'), as a model answers right after "Answer:"; not 'A lot' or "I'm".
MARKED_CHOICE = re.compile(r"####\s*\(?([A-Z])\)?(?![A-Za-z])")
LEADING_CHOICE = re.compile(r"\s*\(?([A-Z])(?:\)|(?=[.:,\n]|$))")


def normalize_number(text: str) -> str:
    """As lm-evaluation-harness's gsm8k filters do: commas, dollar signs and a trailing period removed."""
    text = text.strip().replace(",", "").replace("$", "")
    return text[:-1] if text.endswith(".") else text


def strict_answer(text: str) -> str | None:
    """The number after '#### ', the answer format GSM8K solutions end with."""
    match = STRICT_ANSWER.search(text)
    return normalize_number(match.group(1)) if match else None


def flexible_answer(text: str) -> str | None:
    """The last number anywhere in the answer."""
    matches = FLEXIBLE_ANSWER.findall(text)
    if not matches:
        return None
    return normalize_number(next(group for group in matches[-1] if group))


def choice_answer(text: str) -> str | None:
    """The letter a multiple-choice completion answers with: the last '#### X', else a leading lone letter."""
    marked = MARKED_CHOICE.findall(text)
    if marked:
        return marked[-1]
    leading = LEADING_CHOICE.match(text)
    return leading.group(1) if leading else None
