"""Prompt templates: builtins, user files (and their errors), single-token labels."""
import re

import pytest

from common.errors import UserError
from data import get_template, label_token_ids
from data.templates import BUILTIN


class WordTokenizer:
    """One token per whitespace-led word: " True" is one token, "a b" two."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        words, word = [], ""
        for char in text:
            if char.isspace() and word.strip():
                words.append(word)
                word = ""
            word += char
        return [self.vocab.setdefault(w, len(self.vocab)) for w in words + [word] if w]


class DummyPrefixTokenizer(WordTokenizer):
    """Like sentencepiece's add_dummy_prefix: a space before the text, so " True" alone is "  True"."""

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return super().encode(" " + text)


class ByteTokenizer:
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return list(text.encode())


def test_builtins_render_fields_in_order():
    with_solution = get_template("with_solution").render(question="Q?", answer="42", solution="6*7=42")
    assert with_solution.index("Q?") < with_solution.index("6*7=42") < with_solution.index("Answer: 42")
    assert with_solution.endswith("Answer: 42\nCorrect:")
    original = get_template("original")
    assert not original.uses_solution and get_template("with_solution").uses_solution
    assert original.render(question="Q?", answer="42", solution="secret") == original.render(question="Q?", answer="42")
    assert "secret" not in original.render(question="Q?", answer="42", solution="secret")


def test_labels_follow_the_leading_space_convention(tmp_path):
    assert get_template("with_solution").label_words == (" True", " False")
    (tmp_path / "newline.txt").write_text("Q: {question}\nA: {answer}\nVerdict:\n\n")
    assert get_template(tmp_path / "newline.txt").label_words == ("True", "False")


def test_user_template_file(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("{{json}} {question} | {solution} | {answer} =>\n")
    template = get_template(path)
    assert template.name == str(path)
    assert template.render(question="q", answer="a", solution="s") == "{json} q | s | a =>"  # editor's newline dropped
    assert template.uses_solution


def test_unknown_placeholder_names_the_file(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("{question} {answer} {explanation}")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: unknown placeholder {{explanation}} \(allowed: "):
        get_template(path)


def test_template_without_answer(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("{question} {solution}")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: template has no {{answer}} placeholder$"):
        get_template(path)


def test_unmatched_brace(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("{question} {answer} {")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: template is not valid: .*literal brace"):
        get_template(path)


def test_a_template_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_bytes(b"\xff\xfe{question}{answer}")
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}: template is not UTF-8 text \(byte 0: "):
        get_template(path)


def test_neither_builtin_nor_file(tmp_path):
    with pytest.raises(UserError, match="neither a builtin"):
        get_template(tmp_path / "missing.txt")


def test_label_token_ids():
    tokenizer = WordTokenizer()
    true_id, false_id = label_token_ids(get_template("with_solution"), tokenizer)
    assert (true_id, false_id) == (tokenizer.vocab[" True"], tokenizer.vocab[" False"])
    assert true_id != false_id


def test_label_ids_are_the_tokens_that_continue_the_prompt():
    tokenizer, template = DummyPrefixTokenizer(), get_template("with_solution")
    true_id, false_id = label_token_ids(template, tokenizer)
    assert (true_id, false_id) == (tokenizer.vocab[" True"], tokenizer.vocab[" False"])
    prompt = template.render(question="Q?", answer="42", solution="6*7=42")
    assert tokenizer.encode(prompt + " True") == tokenizer.encode(prompt) + [true_id]


def test_label_after_a_trailing_space_starts_a_new_token(tmp_path):
    llama_models = pytest.importorskip("llama_models")
    from pathlib import Path

    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model")
    (tmp_path / "spaced.txt").write_text("Q: {question}\nA: {answer}\nCorrect: ")
    true_id, false_id = label_token_ids(get_template(tmp_path / "spaced.txt"), tokenizer)
    assert tokenizer.decode([true_id]) == "True" and tokenizer.decode([false_id]) == "False"


def test_label_of_several_tokens_is_refused():
    with pytest.raises(UserError, match=r"label ' True' of template 'original' is 5 tokens .* not one"):
        label_token_ids(get_template("original"), ByteTokenizer())


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_llama3_labels_are_single_tokens(name):
    llama_models = pytest.importorskip("llama_models")
    from pathlib import Path

    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model")
    true_id, false_id = label_token_ids(get_template(name), tokenizer)
    assert tokenizer.decode([true_id]) == " True" and tokenizer.decode([false_id]) == " False"
