"""The streamed verification passes a good model and catches NaN tensors and wrong shapes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shrink.core.errors import ShrinkError


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_good_model_passes(arch, tiny_model_dir):
    from shrink.streaming.verify import verify_streamed

    record = verify_streamed(tiny_model_dir(arch))
    assert record["ok"] and record["cache_matches_no_cache"] and record["finite_tensors"]
    assert record["cache_layers"] == [0, 5] and record["tensors_checked"] > 50
    assert record["prompt_perplexity"] > 1 and record["cache_relative_logit_diff"] < 1e-5


def test_layer_subset_and_bad_layers(tiny_model_dir):
    from shrink.streaming.verify import verify_streamed

    assert verify_streamed(tiny_model_dir("gemma3"), layers=[1, 2, 4])["cache_layers"] == [1, 2, 4]
    with pytest.raises(ShrinkError, match="among 0..5"):
        verify_streamed(tiny_model_dir("llama"), layers=[7])


def test_nan_tensor_is_caught(tiny_model_dir, tmp_path):
    from shrink.streaming.verify import verify_streamed

    folder = copy_model(tiny_model_dir("llama"), tmp_path / "m")
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.3.mlp.up_proj.weight"][5, 7] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ShrinkError, match=r"NaN or inf .*model\.layers\.3\.mlp\.up_proj"):
        verify_streamed(folder)


def test_wrong_shape_is_caught(tiny_model_dir, tmp_path):
    from shrink.streaming.verify import verify_streamed

    folder = copy_model(tiny_model_dir("llama"), tmp_path / "m")
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.2.self_attn.o_proj.weight"] = torch.zeros(64, 32)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ShrinkError, match="o_proj"):
        verify_streamed(folder)


def test_missing_tokenizer_is_caught(tiny_model_dir, tmp_path):
    from shrink.streaming.verify import verify_streamed

    folder = copy_model(tiny_model_dir("llama"), tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(ShrinkError, match="tokenizer"):
        verify_streamed(folder)


def test_broken_cache_is_caught(tiny_model_dir, monkeypatch):
    """Two layers sharing one cache slot (a wrong layer_idx) make the cached logits differ."""
    import shrink.core.layers as layers_mod
    from shrink.streaming.verify import verify_streamed

    swap = layers_mod.swap_layers

    def broken(model, keep):
        undo = swap(model, keep)
        for m in model.modules():
            if hasattr(m, "layer_idx"):
                m.layer_idx = 0
        return undo

    monkeypatch.setattr(layers_mod, "swap_layers", broken)
    with pytest.raises(ShrinkError, match="KV cache"):
        verify_streamed(tiny_model_dir("llama"))


def test_verification_streams_a_model_too_big_for_the_process(tiny_model_dir, monkeypatch):
    import shrink.streaming.memory as memory
    from shrink.runtime.verify import verify_model_dir

    folder = tiny_model_dir("llama")
    whole = verify_model_dir(folder)
    assert "reload" not in whole and whole["cache_matches_no_cache"]
    monkeypatch.setattr(memory, "available_memory", lambda device: 1000)
    streamed = verify_model_dir(folder)
    assert streamed["reload"] == "streamed" and streamed["ok"]


def test_available_memory_follows_the_data_limit():
    """Under ``prlimit --data`` (RLIMIT_DATA) the memory a process may use is its headroom under
    the limit, not the machine's free RAM."""
    import subprocess
    import sys

    code = (
        "import resource\n"
        "from shrink.streaming.memory import available_memory\n"
        "from shrink.core.peaks import process_limit, status_bytes\n"
        "free = available_memory('cpu')\n"
        "used = status_bytes('VmData')\n"
        "limit = used + (300 << 20)\n"
        "resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.RLIM_INFINITY))\n"
        "capped = available_memory('cpu')\n"
        "assert process_limit() == limit, (process_limit(), limit)\n"
        "assert 250 << 20 < capped <= 300 << 20 < free, (capped, free)\n"
        "from shrink.stages.memoryplan import machine_memory\n"
        "assert machine_memory()[1] == limit\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_loading_under_a_memory_limit_reads_instead_of_mapping(tiny_model_dir, monkeypatch):
    """Under a limit the checkpoint does not fit, from_pretrained gets pread-backed slices
    instead of mapping every shard: the same model."""
    import safetensors

    import shrink.core.peaks as peaks
    from shrink.core.models import from_pretrained_checked

    folder = tiny_model_dir("llama")
    whole = from_pretrained_checked(folder, dtype=torch.float32)
    opened = []
    real = safetensors.safe_open

    def spy(*args, **kwargs):
        opened.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", spy)
    monkeypatch.setattr(peaks, "process_headroom", lambda: [1000])
    limited = from_pretrained_checked(folder, dtype=torch.float32)
    assert opened and set(opened) == {"pread"}
    a, b = whole.state_dict(), limited.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert limited.generation_config is not None


def test_a_library_opening_shards_itself_reads_them_under_a_limit(tmp_path):
    """GPTQModel opens the checkpoint's shards with safe_open itself. Under a data limit smaller
    than a shard, safetensors' default (the whole shard mapped copy-on-write) fails; inside
    ``shards_read_not_mapped`` the library's safe_open reads with pread, gets the same tensor,
    and is given back its own safe_open on the way out. A module of another package is not
    touched."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    folder = tmp_path / "ckpt"
    folder.mkdir()
    tensors = {f"t{i}": torch.full((1 << 20,), float(i)) for i in range(48)}  # 48 x 4 MiB
    save_file(tensors, folder / "model.safetensors")
    code = (
        "import resource, sys, types, safetensors\n"
        "from shrink.core.models import shards_read_not_mapped\n"
        "from shrink.core.peaks import status_bytes\n"
        "lib = types.ModuleType('fakelib'); lib.safe_open = safetensors.safe_open\n"
        "other = types.ModuleType('otherlib'); other.safe_open = safetensors.safe_open\n"
        "sys.modules.update(fakelib=lib, otherlib=other)\n"
        "limit = status_bytes('VmData') + (120 << 20)\n"
        "resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.RLIM_INFINITY))\n"
        f"shard = {str(folder / 'model.safetensors')!r}\n"
        "try:\n"
        "    with lib.safe_open(shard, framework='pt') as f: f.get_tensor('t7')\n"
        "    print('mapped'); sys.exit(1)\n"
        "except Exception as e:\n"
        "    assert 'mmap' in str(e) or 'memory' in str(e).lower(), e\n"
        f"with shards_read_not_mapped({str(folder)!r}, ('fakelib',)) as patched:\n"
        "    assert patched and other.safe_open is safetensors.__dict__['_safetensors_rust']"
        ".safe_open\n"
        "    with lib.safe_open(shard, framework='pt') as f: t = f.get_tensor('t7')\n"
        "    assert float(t[0]) == 7.0 and t.numel() == 1 << 20\n"
        "assert lib.safe_open is other.safe_open is safetensors.safe_open\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr[-2000:]
    # without a limit nothing is patched
    from shrink.core.models import shards_read_not_mapped

    with shards_read_not_mapped(folder, ("fakelib",)) as patched:
        assert not patched


def test_a_quantized_folder_is_never_read_layer_by_layer(tiny_model_dir, tmp_path, monkeypatch):
    """The layer-by-layer readers read float checkpoints: a folder whose config says it is
    quantized (GPTQ) is loaded by its own loader, whatever the memory, while the same folder
    without that key is streamed when it does not fit."""
    import shrink.streaming.memory as memory

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama"), folder)
    monkeypatch.setattr(memory, "available_memory", lambda device: 1000)
    assert memory.too_big_to_load(folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    assert not memory.too_big_to_load(folder)
    # its float tensors are loaded in float32 when they fit, else in bfloat16
    assert memory.quantized_cpu_dtype(folder) == torch.bfloat16
    monkeypatch.setattr(memory, "available_memory", lambda device: 1 << 40)
    assert memory.quantized_cpu_dtype(folder) is None
    assert memory.quantized_cpu_dtype(tiny_model_dir("llama")) is None  # not quantized


def test_a_quantized_folder_keeps_float32_while_the_margin_fits(
    tiny_model_dir, tmp_path, monkeypatch
):
    """float32 while QUANTIZED_FLOAT32_MARGIN times the float32 weights fit, bfloat16 past it."""
    import shrink.streaming.memory as memory
    from shrink.streaming.checkpoint import weights_bytes

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    edge = int(weights_bytes(folder, torch.float32) * memory.QUANTIZED_FLOAT32_MARGIN)
    monkeypatch.setattr(memory, "available_memory", lambda device: edge)
    assert memory.quantized_cpu_dtype(folder) is None
    monkeypatch.setattr(memory, "available_memory", lambda device: edge - 1)
    assert memory.quantized_cpu_dtype(folder) == torch.bfloat16
