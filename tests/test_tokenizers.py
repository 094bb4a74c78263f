"""Tokenizers: packaged CLIP BPE (SD 1.x EOS padding, SD 2.x OpenCLIP zero padding) and BERT.

References: transformers' CLIPTokenizer / BertTokenizer loaded with from_pretrained from folders
written here, and a plain-Python OpenAI CLIP BPE (clip/simple_tokenizer.py's algorithm). No network.
"""

import gzip
import json
import math

import numpy as np
import pytest
import regex
import transformers

from ldm_jax.tokenizers import (
    CLIP_PAD_TOKEN_ID,
    OPENCLIP_PAD_TOKEN_ID,
    PACKAGED_BPE,
    BertTokenizer,
    CLIPTokenizer,
    TokenizerFileError,
)

BOS, EOS = 49406, 49407
PROMPTS = [
    "a photo of a cat",
    "  A PHOTO   of\ta\n cat  ",
    "an astronaut riding a horse on mars, 4k, trending on artstation!!!",
    "it's a dog's life; don't you think? (yes) [maybe] {no} #tag @user",
    "café crème brûlée, naïve résumé — “quoted” ‘text’",
    "東京の夜景, Ελληνικά, русский текст, emoji 😀🎨 party",
    "numbers 1234567 and 3.14159 / 2 = 1.57%",
    "wow! great!! a-b_c d/e",
    " ".join(f"token{i}" for i in range(60)),  # > 77 tokens: truncated
    "",
]


# --- independent references -------------------------------------------------------------------
def _byte_encoder() -> dict[int, str]:
    """OpenAI CLIP bytes_to_unicode(): printable bytes map to themselves, the rest to 256 + n."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def _derive_hf_files():
    """vocab.json / merges.txt content as HF derives them from OpenAI's BPE file."""
    lines = gzip.open(PACKAGED_BPE).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_byte_encoder().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _write_reference_folder(folder, vocab, merges, pad_token):
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    config = {"pad_token": pad_token, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _openai_bpe_ids(text, vocab, merges, pad_id):
    """OpenAI CLIP SimpleTokenizer.encode + open_clip.tokenize (prompts here need no ftfy/html)."""
    ranks = {m: i for i, m in enumerate(merges)}
    byte_encoder = _byte_encoder()
    pattern = regex.compile(
        r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        regex.IGNORECASE,
    )
    ids = [BOS]
    for piece in pattern.findall(" ".join(text.split()).lower()):
        word = tuple(byte_encoder[b] for b in piece.encode("utf-8"))
        word = word[:-1] + (word[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: ranks.get(p, math.inf))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        ids += [vocab[w] for w in word]
    ids = (ids + [EOS])[:77]
    ids[-1] = EOS
    return ids + [pad_id] * (77 - len(ids))


@pytest.fixture(scope="module")
def sd1():
    return CLIPTokenizer.from_packaged_vocab()


@pytest.fixture(scope="module")
def sd2():
    return CLIPTokenizer.for_cond_stage("openclip")


@pytest.fixture(scope="module")
def derived():
    return _derive_hf_files()


# --- CLIP ---------------------------------------------------------------------------------------
def test_known_ids_and_vocabulary_layout(sd1):
    ids, mask = sd1(
        ["a photo of a cat", "a photograph of an astronaut riding a horse"],
        return_attention_mask=True,
    )
    assert ids.dtype == np.int32 and ids.shape == (2, 77)
    assert ids[0, :8].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS, EOS]
    assert ids[1, :10].tolist() == [BOS, 320, 8853, 539, 550, 18376, 6765, 320, 4558, EOS]
    assert (ids[0, 6:] == EOS).all() and mask[0].tolist() == [1] * 7 + [0] * 70
    # 256 bytes, 256 bytes + </w>, 48,894 merges, 2 specials: not transformers' 2-token trap.
    assert sd1.vocab_size == len(sd1.hf_tokenizer) == 49408 and len(sd1.merges) == 48894
    assert (sd1.vocab["!"], sd1.vocab["!</w>"], sd1.bos_token_id, sd1.eos_token_id) == (
        0,
        256,
        BOS,
        EOS,
    )


def test_lowercasing_whitespace_and_truncation(sd1):
    a, b, long = sd1(["a photo of a cat", "  A PHOTO   of\ta\n cat  ", PROMPTS[8]])
    np.testing.assert_array_equal(a, b)
    full = sd1.hf_tokenizer(PROMPTS[8])["input_ids"]
    assert len(full) > 77
    assert long.tolist() == full[:76] + [EOS]  # BOS + first 75 tokens + EOS kept last


def test_sd1_and_openclip_padding(sd1, sd2):
    ids1, mask1 = sd1(PROMPTS, return_attention_mask=True)
    ids2, mask2 = sd2(PROMPTS, return_attention_mask=True)
    np.testing.assert_array_equal(mask1, mask2)
    np.testing.assert_array_equal(np.where(mask1 == 1, ids1, -1), np.where(mask2 == 1, ids2, -1))
    assert (ids1[mask1 == 0] == CLIP_PAD_TOKEN_ID).all() and (mask1 == 0).sum() > 500
    assert (ids2[mask2 == 0] == OPENCLIP_PAD_TOKEN_ID).all()
    assert sd2("")[0, :3].tolist() == [BOS, EOS, 0]


def test_packaged_equals_transformers_from_pretrained(sd1, derived, tmp_path):
    folder = _write_reference_folder(tmp_path / "ref", *derived, pad_token="<|endoftext|>")
    reference = transformers.CLIPTokenizer.from_pretrained(folder)
    expected = reference(PROMPTS, padding="max_length", max_length=77, truncation=True)
    ids, mask = sd1(PROMPTS, return_attention_mask=True)
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    assert dict(sd1.vocab) == derived[0] and list(sd1.merges) == derived[1]


def test_openclip_equals_openai_bpe(sd2, derived, tmp_path):
    expected = [_openai_bpe_ids(p, *derived, pad_id=0) for p in PROMPTS]
    np.testing.assert_array_equal(sd2(PROMPTS), expected)
    # Why we pad by id: transformers with pad_token "!" (diffusers' SD 2 folders) makes a typed
    # "!" the special token 0, where open_clip (and we) give "!</w>" = 256.
    folder = _write_reference_folder(tmp_path / "sd2", *derived, pad_token="!")
    hf = transformers.CLIPTokenizer.from_pretrained(folder)("wow!")["input_ids"]
    assert hf == [BOS, 2781, 0, EOS] and sd2("wow!")[0, :4].tolist() == [BOS, 2781, 256, EOS]


def test_write_folder_loads_in_transformers_and_back(sd1, sd2, tmp_path):
    plain = [p for p in PROMPTS if "!" not in p]
    for name, ours, pad_token in (("sd1", sd1, "<|endoftext|>"), ("sd2", sd2, "!")):
        folder = tmp_path / name / "tokenizer"
        ours.write_folder(folder)
        names = ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
        assert sorted(p.name for p in folder.iterdir()) == names
        assert json.loads((folder / "tokenizer_config.json").read_text())["pad_token"] == pad_token
        hf = transformers.CLIPTokenizer.from_pretrained(folder)
        expected = hf(plain, padding="max_length", max_length=77, truncation=True)["input_ids"]
        np.testing.assert_array_equal(ours(plain), expected)
        back = CLIPTokenizer.from_folder(folder)
        assert back.pad_token_id == ours.pad_token_id and back.merges == ours.merges
        np.testing.assert_array_equal(back(PROMPTS), ours(PROMPTS))
        with pytest.raises(FileExistsError, match="vocab.json"):
            ours.write_folder(folder)


def test_folder_with_only_tokenizer_json(sd1, tmp_path):
    sd1.hf_tokenizer.save_pretrained(tmp_path)  # transformers 5 writes tokenizer.json only
    assert not (tmp_path / "vocab.json").exists()
    np.testing.assert_array_equal(CLIPTokenizer.from_folder(tmp_path)(PROMPTS), sd1(PROMPTS))


def test_clip_bad_vocabulary_files(sd1, tmp_path):
    with pytest.raises(TokenizerFileError, match="neither vocab.json and merges.txt"):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(TokenizerFileError, match="is not a folder"):
        CLIPTokenizer.from_folder(tmp_path / "absent")
    sd1.write_folder(tmp_path / "ok")
    (tmp_path / "ok" / "vocab.json").write_text('{"a": 0,')
    with pytest.raises(TokenizerFileError, match=r"vocab.json is not valid JSON"):
        CLIPTokenizer.from_folder(tmp_path / "ok")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "vocab.json").write_text('{"a": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}')
    with pytest.raises(TokenizerFileError, match=r"merges.txt is missing; expected BPE merges"):
        CLIPTokenizer.from_folder(tmp_path / "m")
    (tmp_path / "m" / "merges.txt").write_text("#version: 0.2\na a\nb c d\n")
    with pytest.raises(TokenizerFileError, match=r"merges.txt line 3 is 'b c d'"):
        CLIPTokenizer.from_folder(tmp_path / "m")
    (tmp_path / "m" / "merges.txt").write_text("#version: 0.2\nx y\n")
    with pytest.raises(TokenizerFileError, match="not a valid BPE vocabulary.*`x`"):
        CLIPTokenizer.from_folder(tmp_path / "m")
    data = PACKAGED_BPE.read_bytes()
    cases = {
        "truncated.txt.gz": (data[: len(data) // 2], "EOFError"),
        "plain.txt.gz": (b"#version: 0.2\na b\n", "BadGzipFile"),
        "short.txt.gz": (gzip.compress(b"#version: 0.2\na b\n"), "has 3 lines"),
    }
    for name, (content, reason) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(TokenizerFileError, match=f"{name}.*{reason}.*expected OpenAI CLIP"):
            CLIPTokenizer.from_bpe_file(tmp_path / name)


def test_clip_bad_arguments(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"pad_token_id 49408 .* use 49407 .* or 0"):
        CLIPTokenizer.from_packaged_vocab(pad_token_id=49408)
    with pytest.raises(ValueError, match=r"cond stage 'ldm_bert'; allowed: \['clip', 'openclip'\]"):
        CLIPTokenizer.for_cond_stage("ldm_bert")
    with pytest.raises(TypeError, match=r"items of \['int', 'str'\]"):
        CLIPTokenizer.from_packaged_vocab()(["a", 3])
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        TokenizerFileError, match="hub failed.*Offline, pass a local folder holding"
    ):
        CLIPTokenizer.from_pretrained("org/sd", subfolder="tokenizer", cache_dir=tmp_path)


# --- BERT ---------------------------------------------------------------------------------------
BERT_WORDS = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat"]
BERT_WORDS += ["##s", "!", ",", ".", "the", "dog", "run", "##ning", "cafe", "word"]
BERT_PROMPTS = ["A photo of Cats!", "  the  dog,running CAFÉ. zebra", "word " * 100, ""]


@pytest.fixture
def bert_folder(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    return folder


def _compvis_ids(folder, texts):
    """CompVis BERTTokenizer.forward with transformers' tokenizer loaded from `folder`."""
    hf = transformers.BertTokenizer.from_pretrained(folder)
    out = hf(texts, truncation=True, max_length=77, padding="max_length")
    return np.asarray(out["input_ids"]), np.asarray(out["attention_mask"])


def test_bert_matches_compvis_tokenizer(bert_folder):
    tok = BertTokenizer.from_folder(bert_folder)
    ids, mask = tok(BERT_PROMPTS, return_attention_mask=True)
    assert ids.dtype == np.int32 and ids.shape == (4, 77) and tok.vocab_size == len(BERT_WORDS)
    # [CLS] a photo of cat ##s ! [SEP]; the ... dog , run ##ning cafe . [UNK]; pads are 0.
    assert ids[0, :9].tolist() == [3, 6, 7, 8, 9, 10, 11, 4, 0]
    assert ids[1, :11].tolist() == [3, 14, 15, 12, 16, 17, 18, 13, 2, 4, 0]
    assert ids[2, 0] == 3 and ids[2, 76] == 4 and (ids[2, 1:76] == 19).all()
    assert ids[3, :3].tolist() == [3, 4, 0] and mask[3].sum() == 2
    expected_ids, expected_mask = _compvis_ids(bert_folder, BERT_PROMPTS)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(mask, expected_mask)


def test_bert_write_folder_and_tokenizer_json(bert_folder, tmp_path):
    tok = BertTokenizer.from_folder(bert_folder)
    tok.write_folder(tmp_path / "out")
    assert (tmp_path / "out" / "vocab.txt").read_text() == (bert_folder / "vocab.txt").read_text()
    np.testing.assert_array_equal(
        _compvis_ids(tmp_path / "out", BERT_PROMPTS)[0], tok(BERT_PROMPTS)
    )
    tok.hf_tokenizer.save_pretrained(tmp_path / "json")  # tokenizer.json only
    assert not (tmp_path / "json" / "vocab.txt").exists()
    back = BertTokenizer.from_folder(tmp_path / "json")
    np.testing.assert_array_equal(back(BERT_PROMPTS), tok(BERT_PROMPTS))


def test_bert_hub_id_only_when_named(bert_folder, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot(repo_id, allow_patterns, cache_dir):  # a populated hub cache
        calls.append((repo_id, allow_patterns))
        return str(bert_folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert BertTokenizer.from_pretrained(bert_folder).vocab_size == len(BERT_WORDS)
    assert calls == []  # a local folder never touches the hub
    tok = BertTokenizer.from_pretrained("bert-base-uncased")
    assert calls[0][0] == "bert-base-uncased" and "vocab.txt" in calls[0][1]
    assert tok("a cat")[0, :4].tolist() == [3, 6, 9, 4]
    monkeypatch.undo()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TokenizerFileError, match="pass a local folder holding vocab.txt"):
        BertTokenizer.from_pretrained("bert-base-uncased", cache_dir=tmp_path)
    with pytest.raises(TokenizerFileError, match="does not exist; expected a folder holding"):
        BertTokenizer.from_pretrained(tmp_path / "nowhere")


def test_bert_bad_vocabulary(tmp_path):
    with pytest.raises(TokenizerFileError, match="holds no vocab.txt"):
        BertTokenizer.from_folder(tmp_path)
    cases = {
        "missing": ([w for w in BERT_WORDS if w != "[CLS]"], r"lacks the special .*'\[CLS\]'"),
        "repeated": (BERT_WORDS + ["cat"], r"vocab.txt repeats tokens \['cat'\]"),
        "empty": ([], "vocab.txt is empty"),
    }
    for name, (words, message) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "vocab.txt").write_text("".join(w + "\n" for w in words))
        with pytest.raises(TokenizerFileError, match=message):
            BertTokenizer.from_folder(tmp_path / name)
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "vocab.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(TokenizerFileError, match="cannot read .*vocab.txt.*WordPiece vocabulary"):
        BertTokenizer.from_folder(tmp_path / "binary")


def test_packaged_data_and_licence():
    licence = (PACKAGED_BPE.parent / "LICENSE-CLIP-BPE.txt").read_text()
    assert "MIT License" in licence and "Copyright (c) 2021 OpenAI" in licence
    assert "open-clip-torch" in licence and PACKAGED_BPE.stat().st_size == 1356917
