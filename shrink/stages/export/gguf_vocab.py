"""The tokenizer part of a GGUF file, written the way llama.cpp's converter writes it: SentencePiece
vocabularies as llama/gemma models, byte-level BPE as gpt2 with the pre-tokenizer name llama.cpp
picks its regex by, special tokens and the chat template."""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path

from shrink.core.errors import ShrinkError

# tokenizer.ggml.pre for GPT-2-style BPE tokenizers. llama.cpp picks its pre-tokenizer regex by
# this name; its converter identifies a tokenizer by the sha256 of the token ids of one check
# text (the hashes below are the ones in llama.cpp's convert_hf_to_gguf.py, get_vocab_base_pre).
_CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 "
    "?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? "
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some "
    "tea? We'Ve a'lL"
)
_BPE_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",
    "1444df51289cfa8063b96f0e62b1125440111bc79a52003ea14b6eac7016fd5f": "qwen35",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
}


_PRE_REGEX = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
}


def _pre_from_rules(tokenizer) -> str | None:
    """llama.cpp's pre-tokenizer name from the splitting rules of a loaded fast tokenizer."""
    try:
        pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    except (AttributeError, ValueError):
        return None
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return _PRE_REGEX.get(steps[0].get("pattern", {}).get("Regex", ""))
    return None


def _bpe_pre(tokenizer, tok_file: Path) -> str:
    """tokenizer.ggml.pre: by the hash of the check text's ids (as llama.cpp's converter does),
    else by the tokenizer's splitting rules."""
    chkhsh = sha256(str(tokenizer.encode(_CHECK_TEXT)).encode()).hexdigest()
    pre = _BPE_PRE.get(chkhsh) or _pre_from_rules(tokenizer)
    if pre is None:
        raise ShrinkError(
            f"{tok_file}: this BPE pre-tokenizer (hash {chkhsh[:16]}...) is not one "
            "shrink knows for GGUF (llama.cpp picks its splitting rules by name)"
        )
    return pre


def _merge_ranks(model: dict) -> dict[str, int]:
    """Token -> rank of the first BPE merge that makes it, as llama.cpp scores for its
    SentencePiece tokenizer.

    llama.cpp's "llama" tokenizer merges the adjacent pair whose joined piece has the highest
    score; HF's BPE merges the pair of lowest merge rank. ``gguf.LlamaHfVocab`` gives every
    token the placeholder score -1000, so llama.cpp merged in text order instead: Gemma 3 270M
    read ' spurned' as ' spur'+'ned' where HF reads ' sp'+'urned'. Score = -rank makes the two
    agree (llama.cpp's converter takes SentencePiece's own scores from tokenizer.model, which
    order pieces the same way; a tokenizer.json has only the merges). A token no merge makes
    (single characters, bytes) scores below every merge."""
    ranks: dict[str, int] = {}
    for i, merge in enumerate(model.get("merges") or []):
        a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
        ranks.setdefault(a + b, i)
    return ranks


def write_vocab(w, gguf, src) -> dict:
    """Tokenizer metadata the way llama.cpp's converter writes it; returns what was chosen.
    ``src``: the exporter's source (its ``folder``, ``config`` and ``arch_name``)."""
    folder = src.folder
    tok_file = folder / "tokenizer.json"
    n_vocab = src.config["vocab_size"]
    if not tok_file.is_file():
        raise ShrinkError(
            f"{tok_file} is missing: GGUF embeds the tokenizer, and shrink reads it "
            "from tokenizer.json"
        )
    try:
        tj = json.loads(tok_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ShrinkError(f"cannot read {tok_file}: {e}") from None
    model = tj.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        # SentencePiece-style BPE (Llama 2, Mistral, Gemma) stored as tokenizer.json
        try:
            vocab = gguf.LlamaHfVocab(folder)
        except (FileNotFoundError, TypeError, AssertionError) as e:
            raise ShrinkError(
                f"{tok_file}: unsupported SentencePiece-style tokenizer ({e})"
            ) from None
        ranks = _merge_ranks(model)
        # added tokens match whole before BPE in HF; llama.cpp does that for CONTROL and
        # USER_DEFINED tokens only (LlamaHfVocab marks just the tokenizer's named specials)
        added = {
            t["content"]: (
                gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
            )
            for t in tj.get("added_tokens", [])
        }
        tokens, scores, toktypes = [], [], []
        for text, score, toktype in vocab.all_tokens():
            if toktype == gguf.TokenType.NORMAL:
                piece = text.decode("utf-8", errors="replace")
                if piece in added:
                    toktype = added[piece]
                else:
                    score = -float(ranks.get(piece, len(ranks)))
            tokens.append(text)
            scores.append(score)
            toktypes.append(toktype)
        while len(tokens) < n_vocab:
            tokens.append(f"[PAD{len(tokens)}]".encode())
            scores.append(-1000.0)
            toktypes.append(gguf.TokenType.UNUSED)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(toktypes)
        if src.arch_name == "GEMMA3":
            w.add_add_space_prefix(False)
        special = gguf.SpecialVocab(folder, n_vocab=len(tokens))
        special.add_to_gguf(w, quiet=True)
        return {"tokenizer": "llama (SentencePiece BPE)", "tokens": len(tokens)}
    if model.get("type") != "BPE":
        raise ShrinkError(
            f"{tok_file}: tokenizer model '{model.get('type')}' has no GGUF export "
            "in shrink (BPE tokenizers only)"
        )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    pre = _bpe_pre(tokenizer, tok_file)
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(reverse) >= n_vocab:
        raise ShrinkError(
            f"{tok_file} has token ids up to {max(reverse)} but config.json says "
            f"vocab_size {n_vocab}"
        )
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, toktypes = [], []
    for i in range(n_vocab):
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            toktypes.append(gguf.TokenType.UNUSED)
            continue
        if tok in added:
            if decoder[i].special or (tok.startswith("<|") and tok.endswith("|>")):
                toktypes.append(gguf.TokenType.CONTROL)
            else:
                toktypes.append(gguf.TokenType.USER_DEFINED)
        else:
            toktypes.append(gguf.TokenType.NORMAL)
        tokens.append(tok)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(toktypes)
    special = gguf.SpecialVocab(folder, load_merges=True)
    special.add_to_gguf(w, quiet=True)
    return {"tokenizer": "gpt2 (byte-level BPE)", "pre_tokenizer": pre, "tokens": len(tokens)}


# ------------------------------------------------------------------------------------------------
# tensors
# ------------------------------------------------------------------------------------------------
