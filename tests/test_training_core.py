"""The training core without Ray: the global per-epoch order, run identity, fp32 gates/routers, threads."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from selectmoe.config import FinetuneConfig, WarmupConfig
from selectmoe.training.identity import run_name, training_settings
from selectmoe.training.loop import epoch_order, worker_rows


def test_epoch_order_is_a_seeded_global_permutation_per_epoch():
    n = 1000
    e0, e1 = epoch_order(n, 42, 0), epoch_order(n, 42, 1)
    assert sorted(e0) == list(range(n)) and sorted(e1) == list(range(n))
    assert np.array_equal(e0, epoch_order(n, 42, 0))  # identical on resume
    assert not np.array_equal(e0, e1)  # a new order every epoch
    assert not np.array_equal(e0, epoch_order(n, 43, 0))
    # position vs source row: no correlation left (file order had 0.9996 under the old local buffer)
    assert abs(np.corrcoef(np.arange(n), e0)[0, 1]) < 0.1
    assert epoch_order(5, 42, 0, shuffle=False).tolist() == [0, 1, 2, 3, 4]
    assert e0[:4].tolist() == [978, 933, 859, 916]  # pinned: numpy's PCG64 seeded by [seed, epoch]


def test_worker_slices_make_up_the_global_batch_for_any_world_size():
    order = epoch_order(64, 0, 3)
    for step in range(4):
        whole = worker_rows(order, step, 16, 1, 0)
        halves = [worker_rows(order, step, 16, 2, r) for r in range(2)]
        quarters = [worker_rows(order, step, 16, 4, r) for r in range(4)]
        assert whole.tolist() == order[step * 16 : (step + 1) * 16].tolist()
        assert np.concatenate(halves).tolist() == whole.tolist() == np.concatenate(quarters).tolist()


def _model_dir(tmp_path, name="m", content="weights-1"):
    d = tmp_path / name
    d.mkdir()
    (d / "model.safetensors").write_text(content)
    return d


def test_run_name_changes_with_any_setting_model_or_data(tmp_path):
    model = _model_dir(tmp_path)
    data = tmp_path / "sel.jsonl"
    data.write_text('{"id": 1}\n')
    cfg = WarmupConfig(seed=0)

    def name(c, m=model, d=data):
        return run_name(
            "warmup", training_settings(c), {"model": m, "data": d}, stage_module="selectmoe.stages.warmup"
        )

    base = name(cfg)
    assert base.startswith("warmup-") and len(base) == len("warmup-") + 16
    assert name(cfg) == base
    # the bookkeeping keys do not count: another output or storage dir resumes the same run
    assert name(dataclasses.replace(cfg, output_dir="/elsewhere", storage_path="/s", max_failures=3)) == base
    changed = [
        dataclasses.replace(cfg, lr=1e-3),
        dataclasses.replace(cfg, trainable="gates_only"),
        dataclasses.replace(cfg, epochs=3),
        dataclasses.replace(cfg, quality_loss=dataclasses.replace(cfg.quality_loss, type="mse")),
        dataclasses.replace(cfg, seed=1),
    ]
    names = {name(c) for c in changed}
    assert len(names) == len(changed) and base not in names
    # content, not paths: the same model elsewhere is the same run; an edited one is not
    assert name(cfg, m=_model_dir(tmp_path, "copy")) == base
    assert name(cfg, m=_model_dir(tmp_path, "edited", "weights-2")) != base
    data.write_text('{"id": 2}\n')
    assert name(cfg) != base


def test_finetune_settings_drop_bookkeeping_only():
    settings = training_settings(FinetuneConfig(seed=0), exclude=("base_model",))
    assert {"train_files", "output_dir", "storage_path", "merge_adapter", "base_model"}.isdisjoint(settings)
    assert {"lr", "lora_r", "epochs", "batch_size", "strategy", "seed", "max_length"} <= set(settings)
    json.dumps(settings)  # plain data


@pytest.fixture(scope="module")
def tok():
    from selectmoe.model.tiny import train_bpe_tokenizer

    return train_bpe_tokenizer([f"row {i} of the fox {i % 5}" for i in range(80)], vocab_size=300)


def test_bf16_keeps_gates_and_routers_fp32(tok, tmp_path):
    from selectmoe.model import load_selector
    from selectmoe.model.precision import cast_model
    from selectmoe.model.tiny import build_tiny_select_moe

    model = build_tiny_select_moe(tok, seed=0)
    model.save_pretrained(tmp_path / "sm")
    tok.save_pretrained(tmp_path / "sm")
    loaded, _, _ = load_selector(tmp_path / "sm", dtype="bfloat16")
    dtypes = {n: p.dtype for n, p in loaded.named_parameters()}
    fp32 = {n for n, d in dtypes.items() if d == torch.float32}
    assert fp32 == {n for n in dtypes if ".quality_gate." in n or n.endswith("mlp.gate.weight")}
    assert len(fp32) == 4 * 3  # 4 layers: gate weight + bias, router weight
    assert dtypes["model.layers.0.mlp.experts.gate_up_proj"] == torch.bfloat16
    # a bf16 forward with fp32 gates: the gate score is computed in fp32 from the bf16 hidden state
    ids = torch.randint(3, 290, (2, 9), generator=torch.Generator().manual_seed(0))
    out = loaded(input_ids=ids, output_router_logits=True)
    assert out.router_logits[0]["quality_score"].dtype == torch.float32
    assert out.logits.dtype == torch.bfloat16
    # training under a bf16 cast: fp32 gate gradients
    train = cast_model(build_tiny_select_moe(tok, seed=0), torch.bfloat16)
    train(input_ids=ids, labels=ids).loss.backward()
    assert train.model.layers[0].quality_gate.weight.grad.dtype == torch.float32


def test_torch_threads_sets_and_restores():
    from selectmoe.training.determinism import torch_threads

    before = torch.get_num_threads()
    with torch_threads(3):
        assert torch.get_num_threads() == 3
    assert torch.get_num_threads() == before
