"""Reliability: strict loading, damaged input, --force safety, locks, stale
temporaries, heal resume, Ctrl-C during GPTQ. Tiny random models; real processes for the
interrupt and concurrency cases."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from shrink.core.errors import ShrinkError

ROOT = Path(__file__).resolve().parents[2]
TOK_FILES = ("tokenizer.json", "tokenizer_config.json")


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory, embedded_dir) -> Path:
    """A 3-layer tied Llama (hidden 16) with the embedded model's tokenizer; read-only."""
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
    folder = tmp_path_factory.mktemp("tiny-rel")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    for name in TOK_FILES:
        shutil.copy(embedded_dir / name, folder / name)
    return folder


@pytest.fixture
def model_dir(tiny_src, tmp_path) -> Path:
    """A private copy of the tiny model, free to damage."""
    dst = tmp_path / "M"
    shutil.copytree(tiny_src, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(folder: Path, drop=(), add=None, replace=None) -> None:
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    sd = load_file(f)
    for k in drop:
        del sd[k]
    sd.update(add or {})
    sd.update(replace or {})
    save_file(sd, f, metadata={"format": "pt"})


# ---------------------------------------------------------------------------- 1. strict loading


def test_load_model_accepts_a_good_tied_checkpoint(model_dir):
    from shrink.core.models import check_model_folder, load_model

    loaded = load_model(str(model_dir))  # lm_head.weight is tied: not in the file, not missing
    assert loaded.model.config.num_hidden_layers == 3
    check_model_folder(model_dir)


def test_missing_tensor_is_an_error_naming_it(model_dir):
    from shrink.core.models import check_model_folder, load_model

    _edit_tensors(model_dir, drop=["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(ShrinkError, match=r"1 tensors missing \(model\.layers\.1\.mlp\.up_proj"):
        load_model(str(model_dir))
    with pytest.raises(ShrinkError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        check_model_folder(model_dir)


def test_config_with_more_layers_than_the_checkpoint_is_an_error(model_dir):
    from shrink.core.models import load_model

    _edit_config(model_dir, num_hidden_layers=5)
    with pytest.raises(
        ShrinkError,
        match=r"model\.safetensors does not match .*tensors missing "
        r"\(model\.layers\.3\.",
    ):
        load_model(str(model_dir))


def test_unexpected_tensor_is_an_error(model_dir):
    from shrink.core.models import load_model

    _edit_tensors(model_dir, add={"model.layers.9.extra.weight": torch.zeros(2)})
    with pytest.raises(ShrinkError, match=r"1 unexpected \(model\.layers\.9\.extra\.weight\)"):
        load_model(str(model_dir))


def test_wrong_shape_is_an_error_naming_the_tensor(model_dir):
    from shrink.core.models import load_model

    _edit_tensors(model_dir, replace={"model.layers.0.mlp.up_proj.weight": torch.zeros(8, 16)})
    with pytest.raises(
        ShrinkError,
        match=r"wrong shape .*model\.layers\.0\.mlp\.up_proj\.weight "
        r"\[8, 16\] vs \[32, 16\]",
    ):
        load_model(str(model_dir))


def test_pickle_only_weights_are_refused_by_every_loader(model_dir):
    from shrink.core.models import check_model_folder, load_model
    from shrink.runtime.verify import verify_model_dir

    sd = {
        k: v.clone()
        for k, v in __import__("safetensors.torch", fromlist=["load_file"])
        .load_file(model_dir / "model.safetensors")
        .items()
    }
    (model_dir / "model.safetensors").unlink()
    torch.save(sd, model_dir / "pytorch_model.bin")
    line = r"has weights only in pytorch_model\.bin, not safetensors: shrink reads safetensors only"
    for call in (
        lambda: load_model(str(model_dir)),
        lambda: check_model_folder(model_dir),
        lambda: verify_model_dir(model_dir),
    ):
        with pytest.raises(ShrinkError, match=line):
            call()


def test_generate_refuses_pickle_weights(model_dir):
    from shrink.runtime.generate import generate

    _edit_tensors(model_dir)  # unchanged safetensors...
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")  # ...now only .bin
    with pytest.raises(ShrinkError, match="not safetensors"):
        generate(model_dir, "Hello", max_new_tokens=2)


def test_missing_tokenizer_is_named(model_dir):
    from shrink.core.models import load_model
    from shrink.runtime.verify import verify_model_dir

    for name in TOK_FILES:
        (model_dir / name).unlink()
    with pytest.raises(ShrinkError, match=f"the tokenizer is missing in {model_dir}"):
        load_model(str(model_dir))
    with pytest.raises(ShrinkError, match="the tokenizer is missing"):
        verify_model_dir(model_dir)


# ---------------------------------------------------------------------------- 2. damaged input


@pytest.mark.parametrize("damage", ["empty", "truncated", "random"])
def test_damaged_safetensors_is_named(model_dir, damage):
    from shrink.core.models import load_model
    from shrink.streaming.checkpoint import Checkpoint

    f = model_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(
        {"empty": b"", "truncated": data[: len(data) // 2], "random": os.urandom(4096)}[damage]
    )
    with pytest.raises(ShrinkError, match=f"{f}.*(not a (valid )?safetensors file|truncated)"):
        load_model(str(model_dir))
    with pytest.raises(ShrinkError, match=f"{f}.*(not a (valid )?safetensors file|truncated)"):
        Checkpoint(model_dir)


def test_bad_index_json_is_named(model_dir):
    from shrink.core.models import load_model
    from shrink.streaming.checkpoint import Checkpoint

    index = model_dir / "model.safetensors.index.json"
    index.write_text("{not json")
    for call in (lambda: load_model(str(model_dir)), lambda: Checkpoint(model_dir)):
        with pytest.raises(ShrinkError, match=f"{index} is damaged"):
            call()
    index.write_text(json.dumps({"weight_map": {"x": "model-00002.safetensors"}}))
    with pytest.raises(ShrinkError, match="lists shards that are not in .*model-00002"):
        load_model(str(model_dir))


def test_streaming_checkpoint_must_match_its_config(model_dir):
    from transformers import AutoConfig

    from shrink.streaming.checkpoint import check_complete

    check_complete(model_dir, AutoConfig.from_pretrained(model_dir))
    _edit_tensors(model_dir, drop=["model.layers.2.self_attn.q_proj.weight"])
    with pytest.raises(ShrinkError, match=r"missing \(model\.layers\.2\.self_attn\.q_proj"):
        check_complete(model_dir, AutoConfig.from_pretrained(model_dir))


@pytest.mark.parametrize("body", ["{broken", "[1, 2]", '{"stages": 3}'])
def test_damaged_shrink_json_is_named(model_dir, body):
    from shrink.core.models import read_shrink_json

    (model_dir / "shrink.json").write_text(body)
    with pytest.raises(ShrinkError, match=f"{model_dir / 'shrink.json'} is damaged"):
        read_shrink_json(model_dir)


def test_latin1_jsonl_is_named(tmp_path):
    from shrink.core.data import load_texts

    f = tmp_path / "t.jsonl"
    f.write_bytes('{"text": "ok"}\n{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ShrinkError, match=f"{f} is not UTF-8 text \\(line 2"):
        load_texts(str(f))


def test_seq_len_beyond_the_context_is_refused(model_dir):
    from transformers import AutoConfig, GPT2Config

    from shrink.core.models import check_seq_len

    cfg = AutoConfig.from_pretrained(model_dir)  # max_position_embeddings 64
    check_seq_len(cfg, 64)
    with pytest.raises(
        ShrinkError,
        match=r"--seq-len 128 is beyond the model's context "
        r"\(max_position_embeddings = 64\)",
    ):
        check_seq_len(cfg, 128)
    with pytest.raises(ShrinkError, match=r"context \(\w+ = 32\)"):
        check_seq_len(GPT2Config(n_positions=32), 33)


def test_estimate_refuses_an_encoder(tmp_path):
    from transformers import BertConfig

    from shrink.analysis.estimate import load_config

    BertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    ).save_pretrained(tmp_path)
    with pytest.raises(ShrinkError, match=r"unsupported architecture .*bert.*decoder-only"):
        load_config(str(tmp_path))


def test_nan_perplexity_is_an_error(model_dir):
    from shrink.core.models import load_model
    from shrink.core.perplexity import perplexity

    model = load_model(str(model_dir)).model
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(
        ShrinkError,
        match=r"perplexity is not finite \(nan\): the model produces "
        r"NaN/inf logits",
    ):
        perplexity(model, torch.randint(0, 100, (2, 8)), show_progress=False)


# ---------------------------------------------------------------------------- 3. --force safety


def _write_output(out: Path, force: bool = False, **files: str) -> str:
    """What a stage does: atomic_output + shrink.json (+ files); return the marker id."""
    from shrink.core.outputs import atomic_output, output_id, write_record

    with atomic_output(out, force, on_note=None) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)
        write_record(tmp, None, {"stage": "test"})
        oid = output_id(tmp)
    return oid


def test_every_output_carries_a_marker_whose_id_is_in_shrink_json(tmp_path):
    from shrink.core.outputs import MARKER, read_marker

    out = tmp_path / "out"
    oid = _write_output(out, **{"config.json": "{}"})
    marker = read_marker(out)
    assert marker["id"] == oid and len(oid) == 32
    assert sorted(marker["files"]) == ["config.json", "shrink.json"]
    assert json.loads((out / "shrink.json").read_text())["output_id"] == oid
    assert (out / MARKER).is_file()
    _write_output(out, force=True)  # shrink's own output: --force may replace it
    assert read_marker(out)["id"] != oid


def test_force_refuses_a_shrink_output_with_other_files_in_it(tmp_path):
    from shrink.core.outputs import check_replaceable

    out = tmp_path / "out"
    _write_output(out)
    (out / "paper.tex").write_text("\\documentclass{article}")
    with pytest.raises(
        ShrinkError,
        match=r"refusing to replace .*files shrink did not write "
        r"\(paper\.tex\)",
    ):
        check_replaceable(out)
    with pytest.raises(ShrinkError, match="paper.tex"):
        _write_output(out, force=True)
    assert (out / "paper.tex").is_file()


def test_force_refuses_a_marker_that_does_not_match_shrink_json(tmp_path):
    from shrink.core.outputs import check_replaceable

    out = tmp_path / "out"
    _write_output(out)
    rec = json.loads((out / "shrink.json").read_text())
    rec["output_id"] = "0" * 32
    (out / "shrink.json").write_text(json.dumps(rec))
    with pytest.raises(ShrinkError, match="belongs to another output"):
        check_replaceable(out)


@pytest.mark.parametrize(
    "files",
    [
        {"report.json": "{}", "paper.tex": "x"},
        {"stages/01-prune/x": "x", "notes.txt": "x"},
        {"shrink.json": "{}", "data.csv": "1"},
    ],
)
def test_force_refuses_a_folder_of_other_files(tmp_path, files):
    from shrink.core.outputs import check_replaceable

    folder = tmp_path / "work"
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    with pytest.raises(ShrinkError, match="refusing to replace"):
        check_replaceable(folder)


def test_force_may_replace_a_plain_model_folder(model_dir):
    from shrink.core.outputs import check_replaceable

    check_replaceable(model_dir)  # config.json + safetensors + tokenizer (a hub download)
    (model_dir / "thesis.pdf").write_bytes(b"%PDF")
    with pytest.raises(ShrinkError, match=r"not part of a model \(thesis\.pdf\)"):
        check_replaceable(model_dir)


def test_force_refuses_the_home_folders_ancestors_and_the_root(tmp_path, monkeypatch):
    from shrink.core.outputs import check_output, check_replaceable

    p = tmp_path / "x" / "p"
    (p / "user").mkdir(parents=True)
    (p / "config.json").write_text("{}")
    (p / "model.safetensors").write_bytes(b"")
    monkeypatch.setenv("HOME", str(p / "user"))
    monkeypatch.chdir(tmp_path)
    for folder in (p, p.parent, Path("/")):
        with pytest.raises(ShrinkError, match="refusing to replace .*(home folder|root)"):
            check_replaceable(folder)
    with pytest.raises(ShrinkError, match="current or home folder"):
        check_output(tmp_path, force=True)  # the current folder itself


def test_output_must_not_be_the_input(model_dir, tmp_path):
    from shrink.core.outputs import atomic_output, check_not_source, check_output

    check_not_source(tmp_path / "elsewhere", model_dir)
    with pytest.raises(ShrinkError, match="is the input model folder"):
        check_output(model_dir, force=True, source=model_dir)
    with pytest.raises(ShrinkError, match="is the input model folder"):
        with atomic_output(model_dir, force=True, source=model_dir):
            pass
    assert (model_dir / "model.safetensors").is_file()
    for out, what in (
        (model_dir, "is the input model folder"),
        (model_dir / "sub", "is inside the input"),
        (model_dir.parent, "holds the input"),
    ):
        with pytest.raises(ShrinkError, match=what):
            check_not_source(out, model_dir)


def test_resume_only_into_a_folder_shrink_wrote(tmp_path):
    from shrink.core.outputs import check_resumable, mark_output

    checkout = tmp_path / "repo"
    checkout.mkdir()
    (checkout / "README.md").write_text("mine")
    with pytest.raises(ShrinkError, match="was not written by shrink"):
        check_resumable(checkout)
    build = tmp_path / "build"
    (build / "stages").mkdir(parents=True)
    mark_output(build)
    check_resumable(build)
    (build / "README.md").write_text("added by hand")
    with pytest.raises(ShrinkError, match=r"files shrink did not write \(README\.md\)"):
        check_resumable(build)


# ---------------------------------------------------------------------------- 4. concurrent runs

_HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from shrink.core.outputs import atomic_output
    with atomic_output(sys.argv[1], on_note=None) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "big.bin").write_bytes(b"x" * 100000)
        print("writing", flush=True)
        time.sleep(float(sys.argv[2]))
    print("done", flush=True)
""")


def _start_writer(out: Path, seconds: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(out), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout.readline().strip() == "writing"
    return proc


def test_a_second_run_into_the_same_output_fails_clearly(tmp_path):
    out = tmp_path / "out"
    proc = _start_writer(out, 30)
    try:
        with pytest.raises(
            ShrinkError, match=f"another shrink process is writing {out} \\(pid {proc.pid}\\)"
        ):
            _write_output(out, force=True)
    finally:
        proc.kill()
        proc.wait()
    # the kernel dropped the dead writer's lock: the next run proceeds
    _write_output(out)
    assert (out / "shrink.json").is_file()


def test_an_output_that_appears_meanwhile_is_not_replaced_without_force(tmp_path):
    from shrink.core.outputs import atomic_output

    out = tmp_path / "out"
    with pytest.raises(ShrinkError, match="appeared while this run was writing it"):
        with atomic_output(out, on_note=None) as tmp:
            (tmp / "config.json").write_text("{}")
            out.mkdir()
            (out / "theirs.txt").write_text("x")  # a writer that took no lock
    assert (out / "theirs.txt").is_file()
    assert not list(tmp_path.glob(".out.partial-*"))


# ---------------------------------------------------------------------------- 5. stale temporaries


def test_kill_9_leftovers_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    proc = _start_writer(out, 60)
    partial = tmp_path / f".out.partial-{proc.pid}"
    assert partial.is_dir()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert partial.is_dir()  # what kill -9 leaves
    notes: list[str] = []
    from shrink.core.outputs import atomic_output

    with atomic_output(out, on_note=notes.append) as tmp:
        (tmp / "config.json").write_text("{}")
    assert not partial.exists()
    assert len(notes) == 1 and re.search(r"removed 1 temporary folder.*\(0\.1 MB freed\)", notes[0])


def test_a_live_process_temporary_and_the_heal_work_folder_are_kept(tmp_path):
    from shrink.core.outputs import remove_stale_temporaries

    out = tmp_path / "out"
    live = tmp_path / f".out.partial-{os.getppid()}"
    live.mkdir()
    work = tmp_path / ".out.heal-work"
    (work / "checkpoint-2").mkdir(parents=True)
    n, freed, notes = remove_stale_temporaries(out)
    assert n == 0 and live.is_dir() and work.is_dir()
    assert any("--resume" in note for note in notes)


def test_a_death_between_the_two_renames_restores_the_previous_output(tmp_path):
    from shrink.core.outputs import remove_stale_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    old = tmp_path / f".out.old-{dead.pid}"
    old.mkdir()
    (old / "config.json").write_text("{}")
    remove_stale_temporaries(out)
    assert (out / "config.json").is_file() and not old.exists()


# ---------------------------------------------------------------------------- 6. heal resume


def _checkpoint(work: Path, step: int, complete: bool = True, truncated: bool = False) -> Path:
    from safetensors.torch import save_file

    d = work / f"checkpoint-{step}"
    d.mkdir(parents=True)
    save_file({"a": torch.zeros(64)}, d / "adapter_model.safetensors")
    if truncated:
        data = (d / "adapter_model.safetensors").read_bytes()
        (d / "adapter_model.safetensors").write_bytes(data[: len(data) - 40])
    if complete:
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return d


@pytest.mark.parametrize("damage", ["no trainer_state", "half trainer_state", "cut weights"])
def test_heal_resume_skips_a_checkpoint_killed_mid_write(tmp_path, damage):
    from shrink.stages.heal.trainer import last_valid_checkpoint

    work = tmp_path / ".out.heal-work"
    good = _checkpoint(work, 2)
    bad = _checkpoint(
        work, 4, complete=damage != "no trainer_state", truncated=damage == "cut weights"
    )
    if damage == "half trainer_state":
        (bad / "trainer_state.json").write_text('{"global_st')
    last, incomplete = last_valid_checkpoint(work)
    assert last == str(good) and incomplete == [bad]


# ---------------------------------------------------------------------------- 7. Ctrl-C during GPTQ

_GPTQ_LIKE = textwrap.dedent("""
    import signal, sys, tempfile, threading
    from shrink.runtime.gptq import gptq_interrupts
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a library took SIGINT over
    swallow = sys.argv[2] == "swallow"
    try:
        with gptq_interrupts(sys.argv[1]) as work:
            offload = tempfile.TemporaryDirectory(prefix="gptqmodel_")  # as QuantizeConfig does
            print(offload.name, flush=True)
            while True:
                try:
                    threading.Event().wait()  # the main thread waiting for GPTQ's workers
                except KeyboardInterrupt:
                    if not swallow:
                        raise
                    print("swallowed", flush=True)  # a library that ignores the first Ctrl-C
    except KeyboardInterrupt:
        print("KeyboardInterrupt", flush=True)
        sys.exit(130)
""")


@pytest.mark.parametrize("mode", ["raise", "swallow"])
def test_ctrl_c_stops_gptq_and_leaves_no_temporary_folder(tmp_path, mode):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _GPTQ_LIKE, str(out), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    offload = Path(proc.stdout.readline().strip())
    work = tmp_path / f".out.gptq-{proc.pid}"
    assert offload.parent == work and offload.is_dir()  # not in the system temp folder
    time.sleep(0.5)  # let it reach the wait
    proc.send_signal(signal.SIGINT)
    if mode == "swallow":
        assert proc.stdout.readline().strip() == "swallowed"
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # the second Ctrl-C leaves at once
    rc = proc.wait(timeout=20)
    rest = proc.stdout.read()
    assert rc == 130
    assert ("KeyboardInterrupt" in rest) == (mode == "raise")
    if mode == "swallow":
        assert "interrupted" in proc.stderr.read()
    assert not work.exists()
