import io
import json
import os
import shutil
from pathlib import Path

import pytest
import sentencepiece

from common.errors import UserError
from model.default import packaged_gguf
from model.tokenizer import (BPE_FILE, BPE_FORMAT, SentencePieceTokenizer, TiktokenTokenizer,
                             check_runs_on_tiktoken, load_tokenizer)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

MATH_CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "1 22 333 4444 55555 666666 7777777 88888888 1234567890123 0.5 -3.14159 1,000,000 2024",
    "$$\\frac{a^2+b^2}{c_{n-1}} = \\sqrt{x} \\cdot \\sum_{i=1}^{n} i^2$$ and \\(\\alpha \\le \\beta\\)",
    "48/2 = <<48/2=24>>24 clips\n#### 72",
    "The answer is 3. 3 + 4 = 7; 10% of 250 is 25.\n\n\nDone.",
    "spaces:  two   three    four\ttab\t\ttabs  \n  indented\r\nwindows line end  1  22   333",
    "unicode: √2 ≈ 1.414, π ≈ 3.14159, ∑ ∫ ∞ ≠ ± × ÷ ° €5 ¥30 £2.50 ½ ¾ ²³ naïve café Ωμ 中文数字 ٣٤ 😀👍🏽",
    "contractions: it's, they're, we've, I'm, you'll, he'd, DON'T, It'S",
    "<|begin_of_text|>text with <|eot_id|> specials <|im_start|>user\nhi<|im_end|><|endoftext|>",
    "",
    " ",
    "\n",
    "trailing space ",
    "x" * 300 + " " + "9" * 40,
]


def math_corpus() -> list[str]:
    """MATH_CORPUS plus real GSM8K problems and solutions when the shared data is beside the repo."""
    texts = list(MATH_CORPUS)
    train = SHARED_DATA / "gsm8k" / "train.jsonl"
    if train.is_file():
        with train.open() as f:
            for line, _ in zip(f, range(150)):
                row = json.loads(line)
                texts += [row["question"], row["answer"]]
    return texts


def llama3_model_file() -> Path:
    llama_models = pytest.importorskip("llama_models", reason="Meta's llama_models package is not installed")
    return Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"


@pytest.fixture(scope="module")
def meta_llama3():
    tokenizer_module = pytest.importorskip("llama_models.llama3.tokenizer")
    return tokenizer_module.Tokenizer(llama3_model_file())


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer(llama3_model_file())


def test_llama3_ids_match_meta_tokenizer(llama3, meta_llama3):
    for text in math_corpus():
        for bos, eos in ((False, False), (True, True)):
            assert llama3.encode(text, bos=bos, eos=eos) == meta_llama3.encode(text, bos=bos, eos=eos), text


def test_llama3_special_ids_match_meta(llama3, meta_llama3):
    assert isinstance(llama3, TiktokenTokenizer)
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id) == (meta_llama3.bos_id, meta_llama3.eos_id,
                                                              meta_llama3.pad_id) == (128000, 128001, 128004)
    assert llama3.vocab_size == meta_llama3.n_words == 128256
    assert llama3.add_bos
    assert llama3.decode(list(meta_llama3.special_tokens.values())) == "".join(meta_llama3.special_tokens)


def test_special_token_text_is_encoded_as_plain_text(llama3):
    ids = llama3.encode("<|begin_of_text|><|eot_id|>")
    assert max(ids) < 128000 and len(ids) > 2
    assert llama3.decode(ids) == "<|begin_of_text|><|eot_id|>"


def test_llama3_batch_equals_single_and_decode_round_trips(llama3):
    texts = math_corpus()
    batch = llama3.encode_batch(texts)
    assert batch == [llama3.encode(text) for text in texts]
    assert [llama3.decode(ids) for ids in batch] == texts


def test_numbers_split_into_groups_of_three_digits(llama3):
    assert [llama3.decode([i]) for i in llama3.encode("1234567")] == ["123", "456", "7"]


def test_finds_tokenizer_in_original_folder(tmp_path, llama3):
    (tmp_path / "original").mkdir()
    shutil.copy(llama3_model_file(), tmp_path / "original" / "tokenizer.model")
    found = load_tokenizer(tmp_path)
    assert found.fingerprint == llama3.fingerprint
    assert found.encode("12 apples") == llama3.encode("12 apples")


def test_missing_tokenizer_names_every_path_tried(tmp_path):
    with pytest.raises(UserError) as err:
        load_tokenizer(tmp_path)
    for tried in (BPE_FILE, "tokenizer.model", os.path.join("original", "tokenizer.model")):
        assert str(tmp_path / tried) in str(err.value)


@pytest.mark.parametrize("content", [b"hello world, not a tokenizer\n", b'{"format": "other"}', b"\x00\x01\x02"])
def test_unrecognised_file_is_refused(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(UserError, match="not a tokenizer"):
        load_tokenizer(path)


def test_truncated_llama3_ranks_are_refused(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"".join(llama3_model_file().read_bytes().splitlines(keepends=True)[:1000]))
    with pytest.raises(UserError, match="128000"):
        load_tokenizer(path)


@pytest.fixture(scope="module")
def sentencepiece_file(tmp_path_factory) -> Path:
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(math_corpus()), model_writer=model, vocab_size=1000, hard_vocab_limit=False,
        model_type="bpe", byte_fallback=True, minloglevel=2,
    )
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def test_sentencepiece_model_is_recognised(sentencepiece_file):
    tokenizer = load_tokenizer(sentencepiece_file.parent)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_file))
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert tokenizer.add_bos and tokenizer.vocab_size == reference.vocab_size()
    assert tokenizer.pad_id == tokenizer.eos_id == reference.eos_id()  # no pad piece: pad with eos
    texts = math_corpus()
    assert tokenizer.encode_batch(texts) == [reference.encode(text) for text in texts]
    assert tokenizer.encode("7 + 5", bos=True, eos=True) == [reference.bos_id(), *reference.encode("7 + 5"),
                                                             reference.eos_id()]
    assert tokenizer.decode(tokenizer.encode("12 + 30 = 42")) == "12 + 30 = 42"


def test_label_ids_with_a_dummy_prefix_continue_the_prompt(tmp_path):
    """Llama-2's sentencepiece settings: a dummy-prefix space and spaces kept as written, so " True" alone is
    "▁", "▁True"; after the prompt it is the one token "▁True"."""
    from data import get_template, label_token_ids
    from data.templates import BUILTIN

    rows = [get_template(name).render(question=f"What is {a} + 3?", answer=str(a + 3 + a % 2), solution=f"{a}+3")
            for name in BUILTIN for a in range(30)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([row + label for row in rows for label in (" True", " False")]), model_writer=model,
        vocab_size=400, hard_vocab_limit=False, model_type="bpe", byte_fallback=True, add_dummy_prefix=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = load_tokenizer(tmp_path)
    assert isinstance(tokenizer, SentencePieceTokenizer) and len(tokenizer.encode(" True")) == 2
    for name in BUILTIN:
        true_id, false_id = label_token_ids(get_template(name), tokenizer)
        assert tokenizer.processor.id_to_piece([true_id, false_id]) == ["▁True", "▁False"]
        prompt = get_template(name).render(question="What is 40 + 2?", answer="42", solution="40+2")
        assert tokenizer.encode(prompt + " False") == tokenizer.encode(prompt) + [false_id]


def test_fingerprint_follows_content(sentencepiece_file, llama3, tmp_path):
    assert load_tokenizer(sentencepiece_file).fingerprint == load_tokenizer(sentencepiece_file).fingerprint
    assert load_tokenizer(sentencepiece_file).fingerprint != llama3.fingerprint
    edited = tmp_path / "tokenizer.model"
    lines = llama3_model_file().read_bytes().splitlines(keepends=True)
    lines[500], lines[501] = lines[501], lines[500]  # two tokens trade ids
    edited.write_bytes(b"".join(lines))
    assert load_tokenizer(edited).fingerprint != llama3.fingerprint


def write_byte_level(folder: Path, tokens: list[str], merges: list[str]) -> Path:
    spec = {"format": BPE_FORMAT, "pre": "smollm", "bos_id": 0, "eos_id": 0, "pad_id": 0, "add_bos": False,
            "tokens": ["<|endoftext|>", *tokens], "token_types": [3] + [1] * len(tokens), "merges": merges}
    (folder / BPE_FILE).write_text(json.dumps(spec))
    return folder


def test_byte_level_bpe_follows_merges(tmp_path):
    tokenizer = load_tokenizer(write_byte_level(tmp_path, ["a", "b", "c", "Ġ", "ab", "Ġab"], ["a b", "Ġ ab"]))
    assert tokenizer.encode("abc ab") == [5, 3, 6]
    assert tokenizer.decode([0, 6]) == "<|endoftext|> ab"


def test_merges_out_of_id_order_are_refused(tmp_path):
    write_byte_level(tmp_path, ["a", "b", "c", "ab", "bc"], ["b c", "a b"])
    with pytest.raises(UserError, match="merge 1 'a b'"):
        load_tokenizer(tmp_path)


def test_token_its_merges_cannot_build_is_refused():
    # merges make "abc" into [a, bc]; tiktoken would return the whole token "abc"
    tokens, merges = ["a", "b", "c", "bc", "ab", "abc"], ["b c", "a b", "ab c"]
    with pytest.raises(UserError, match="'abc' is not what its merges produce"):
        check_runs_on_tiktoken("test", tokens, [1] * len(tokens), merges)


def test_byte_missing_from_vocabulary_is_an_error(tmp_path):
    tokenizer = load_tokenizer(write_byte_level(tmp_path, ["a", "b"], []))
    assert tokenizer.encode_batch(["ab"]) == [[1, 2]]
    with pytest.raises(UserError, match="'c'"):
        tokenizer.encode("abc")
    with pytest.raises(UserError, match="'c'"):
        tokenizer.encode_batch(["ab", "cab"])


@pytest.fixture(scope="module")
def smollm2_reference():
    """transformers' tokenizer built from the same GGUF, with two settings made to match ours:
    - its pre-tokenizer set to SmolLM2's own (tokenizer.json: each digit alone, then GPT-2's byte-level
      rule). transformers leaves tokenizer.ggml.pre = "smollm" unmapped and splits like plain GPT-2, which
      differs from SmolLM2 and llama.cpp on whitespace before a digit ("and  2/5": "ĠĠ" vs "Ġ", "Ġ");
    - split_special_tokens=True: special-token text in the input is plain text, as in our encode."""
    transformers = pytest.importorskip("transformers", reason="transformers (test-only reference) is missing")
    from tokenizers import pre_tokenizers

    gguf_file = packaged_gguf()
    reference = transformers.AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                           split_special_tokens=True)
    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return reference


def test_gguf_tokenizer_matches_transformers(smollm2_dir, smollm2_reference):
    tokenizer = load_tokenizer(smollm2_dir)
    texts = math_corpus() + ["and  2/5 times", "x 12345 a  1", "\t 7\n  8"]
    expected = [smollm2_reference(text, add_special_tokens=False)["input_ids"] for text in texts]
    assert tokenizer.encode_batch(texts) == expected
    assert [tokenizer.decode(ids) for ids in expected] == texts
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
        smollm2_reference.bos_token_id, smollm2_reference.eos_token_id, smollm2_reference.pad_token_id)
    assert tokenizer.vocab_size == len(smollm2_reference) == 49152
    assert not tokenizer.add_bos  # tokenizer.ggml.add_bos_token = false


def test_gguf_tokenizer_splits_every_digit(smollm2_dir):
    tokenizer = load_tokenizer(smollm2_dir)
    assert [tokenizer.decode([i]) for i in tokenizer.encode("x=2024")] == ["x", "=", "2", "0", "2", "4"]
