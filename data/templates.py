"""Prompt templates: how a row (question, answer, solution) becomes the text the classifier reads.

The prompt is the whole input sequence. The label is never appended: the classifier reads the hidden
state of the prompt's last token and scores it against the lm_head rows of the two label tokens.
"""
import string
from dataclasses import dataclass
from pathlib import Path

from common.errors import UserError

FIELDS = ("question", "answer", "solution")

BUILTIN = {
    # Question and answer only, like the competition's starter prompt.
    "original": (
        "Decide whether the answer to the math question is correct. Reply True or False.\n"
        "Question: {question}\n"
        "Answer: {answer}\n"
        "Correct:"
    ),
    # The worked solution as the explanation before the answer (the default).
    "with_solution": (
        "Decide whether the answer to the math question is correct. Reply True or False.\n"
        "Question: {question}\n"
        "Explanation: {solution}\n"
        "Answer: {answer}\n"
        "Correct:"
    ),
}
DEFAULT = "with_solution"


@dataclass(frozen=True)
class Template:
    name: str  # a builtin name or the file it was read from
    text: str  # str.format syntax with {question}, {answer}, {solution}; {{ and }} are literal braces

    @property
    def uses_solution(self) -> bool:
        return "solution" in _placeholders(self.text)

    @property
    def label_words(self) -> tuple[str, str]:
        """(true, false) as the model should continue the prompt: " True" after "Correct:", "True" after a newline."""
        space = "" if self.text[-1:].isspace() else " "
        return space + "True", space + "False"

    def render(self, question: str, answer: str, solution: str = "") -> str:
        return self.text.format(question=question, answer=answer, solution=solution)


def _placeholders(text: str) -> list[str]:
    return [field for _, field, _, _ in string.Formatter().parse(text) if field is not None]


def get_template(name_or_path: str | Path) -> Template:
    """A builtin template by name ("original", "with_solution") or a user template file."""
    if str(name_or_path) in BUILTIN:
        return Template(str(name_or_path), BUILTIN[str(name_or_path)])
    path = Path(name_or_path)
    if not path.is_file():
        raise UserError(f"template {str(name_or_path)!r} is neither a builtin ({', '.join(BUILTIN)}) nor a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: template is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise UserError(f"{path}: template cannot be read ({e.strerror})") from None
    if text.endswith("\n"):  # the newline editors add at the end of a file is not part of the prompt
        text = text[:-1]
    try:
        fields = _placeholders(text)
    except ValueError as e:  # an unmatched brace
        raise UserError(f"{path}: template is not valid: {e} (write a literal brace as {{{{ or }}}})") from None
    for field in fields:
        if field not in FIELDS:
            allowed = ", ".join(f"{{{f}}}" for f in FIELDS)
            raise UserError(f"{path}: unknown placeholder {{{field}}} (allowed: {allowed})")
    for field in ("question", "answer"):
        if field not in fields:
            raise UserError(f"{path}: template has no {{{field}}} placeholder")
    return Template(str(path), text)


def label_token_ids(template: Template, tokenizer) -> tuple[int, int]:
    """(true_id, false_id): the single token each label word is when it continues the prompt. The word is encoded
    after the prompt's text, not alone: a sentencepiece tokenizer would give it a dummy-prefix space of its own."""
    prompt = template.render(question="", answer="", solution="")
    head = tokenizer.encode(prompt)
    ids = []
    for word in template.label_words:
        tokens = tokenizer.encode(prompt + word)
        # Where the prompt's last token would swallow the word's start (a trailing space), the word starts anew.
        tokens = tokens[len(head):] if tokens[:len(head)] == head else tokenizer.encode(word)
        if len(tokens) != 1:
            raise UserError(
                f"label {word!r} of template {template.name!r} is {len(tokens)} tokens {tokens} after the prompt for "
                "this tokenizer, not one; end the template so that the label is a single token (e.g. with 'Correct:')"
            )
        ids.append(tokens[0])
    return ids[0], ids[1]
