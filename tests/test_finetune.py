"""Finetune stage: LoRA on the tiny dense target through the Ray Train loop (one fit for the module)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from selectmoe.config import FinetuneConfig
from selectmoe.stages.finetune import (
    LoraModelFactory,
    check_batch_arithmetic,
    export_lora,
    import_lora,
    prepare_tokenizer,
    run_finetune,
)
from selectmoe.training.batching import grad_accum_steps

# the fixture run's logged loss per step (seeded, deterministic CPU kernels, 1 thread per worker)
PINNED_LOSSES = [
    5.8054, 5.8373, 5.7395, 5.4288, 5.1614, 5.0338, 5.0089, 4.9777,
    4.9021, 4.9394, 4.9141, 4.9337, 4.9256, 4.9232, 4.9099, 4.9089,
]  # fmt: skip
COLORS = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange"]


def _rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable pattern: the answer repeats the colour named in the question."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        color = rng.choice(COLORS)
        rows.append(
            {
                "dataset": "toy",
                "id": f"toy-{i}",
                "scores": [rng.random()],
                "cluster": i % 4,
                "messages": [
                    {"role": "user", "content": f"What colour is the {color} ball?"},
                    {"role": "assistant", "content": f"The ball is {color}. It is {color}."},
                ],
            }
        )
    return rows


def write_selection(path: Path, n: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(n, seed)))
    return path


def build_tiny_target(out_dir: Path) -> Path:
    """Tokenizer + tiny Llama target saved in ``out_dir`` (``selectmoe.model.tiny``)."""
    from selectmoe.model.tiny import build_tiny_dense_target, train_bpe_tokenizer

    texts = [m["content"] for r in _rows(200, seed=1) for m in r["messages"]]
    texts += ["<|user|>", "<|assistant|>", "The following are multiple choice questions", "Answer: A B C D"]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=320)
    model = build_tiny_dense_target(tokenizer, arch="llama", seed=0)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory) -> Path:
    return build_tiny_target(tmp_path_factory.mktemp("ft_target") / "target")


def _cfg(tmp: Path, target: Path, sel: Path, **overrides) -> FinetuneConfig:
    base = dict(
        base_model=str(target),
        train_files={"sel": str(sel)},
        output_dir=str(tmp / "finetune"),
        storage_path=str(tmp / "ray_results"),
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        lr=5e-3,
        epochs=2,
        batch_size=8,
        micro_batch_size=4,
        max_length=64,
        warmup_ratio=0.1,
        num_workers=1,
        use_gpu=False,
        checkpoint_every=100,
        log_every=1,
        seed=0,
    )
    base.update(overrides)
    return FinetuneConfig(**base)


@pytest.fixture(scope="module")
def trained(ray_local, tiny_target, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft_run")
    sel = write_selection(tmp / "selected_data.jsonl", 64)
    cfg = _cfg(tmp, tiny_target, sel)
    return cfg, run_finetune(cfg)


@pytest.mark.pinned
def test_lora_finetune_lowers_loss_and_writes_manifests(trained):
    cfg, result = trained
    run = result.runs["sel"]
    assert run.n_rows == 64 and run.steps == 16  # 64 rows / batch 8 x 2 epochs
    assert run.n_tokens > 64 * 10 and 0 < run.n_label_tokens < run.n_tokens  # assistant_only labels
    assert len(run.losses) == 16
    # bit-reproducible on CPU: the loss falls 5.8054 -> 4.9089 (every step pinned in test_logged_losses_are_pinned)
    assert (run.first_loss, run.last_loss) == pytest.approx((PINNED_LOSSES[0], PINNED_LOSSES[-1]), abs=1e-4)
    manifest = json.loads((Path(cfg.output_dir) / "sel" / "_manifest.json").read_text())
    assert manifest["stage"] == "finetune"
    assert manifest["counts"]["rows"] == 64 and manifest["counts"]["steps"] == 16
    assert manifest["extra"]["first_loss"] == pytest.approx(run.first_loss)
    overall = json.loads((Path(cfg.output_dir) / "_manifest.json").read_text())
    assert overall["counts"]["runs"] == 1 and "sel" in overall["extra"]["runs"]
    # no eval_fn: the epoch-1 end (step 8) is a log step, not a checkpoint; checkpoint_every=100 > 16 steps
    ray_run = Path(manifest["extra"]["checkpoint"]).parent
    assert sorted(p.name for p in ray_run.glob("checkpoint_0*")) == ["checkpoint_00000016"]
    assert set(result.summary()["runs"]["sel"]) >= {"rows", "steps", "first_loss", "last_loss"}


def test_adapter_reloads_with_identical_logits(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from selectmoe.training.loop import TRAINABLE_FILE

    cfg, result = trained
    run = result.runs["sel"]
    adapter = Path(run.adapter_dir)
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "tokenizer.json").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8

    # "the trained model": a fresh LoRA model with the final checkpoint's tensors
    ckpt = json.loads((Path(cfg.output_dir) / "sel" / "_manifest.json").read_text())["extra"]["checkpoint"]
    from safetensors.torch import load_file

    factory = LoraModelFactory(cfg.base_model, 8, 16, 0.0, list(cfg.lora_target_modules))
    trained_model = factory()
    import_lora(trained_model, load_file(str(Path(ckpt) / TRAINABLE_FILE)))
    assert any(v.abs().sum() > 0 for k, v in export_lora(trained_model).items() if "lora_B" in k)

    base = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, str(adapter))
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    trained_model.eval()
    reloaded.eval()
    with torch.no_grad():
        a = trained_model(input_ids=ids).logits
        b = reloaded(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(cfg.base_model, dtype=torch.float32)(
            input_ids=ids
        ).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, plain)  # the adapter changes the model

    # lm-eval's HF backend loads the same adapter with peft=
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=cfg.base_model, peft=str(adapter), dtype="float32", device="cpu", batch_size=1)
    with torch.no_grad():
        c = lm.model(input_ids=ids).logits
    assert torch.allclose(a, c, atol=1e-6)


def test_selection_smaller_than_one_global_batch_is_an_error(ray_local, tiny_target, tmp_path):
    sel = write_selection(tmp_path / "small.jsonl", 5)
    cfg = _cfg(tmp_path, tiny_target, sel)
    with pytest.raises(
        ValueError, match=r"5 selected rows do not fill one global batch of finetune.batch_size=8"
    ):
        run_finetune(cfg)


def test_batch_arithmetic_is_exact():
    assert grad_accum_steps(128, 4, 1) == 32
    assert grad_accum_steps(128, 4, 4) == 8
    cfg = FinetuneConfig(batch_size=128, micro_batch_size=4, num_workers=2)
    assert check_batch_arithmetic(cfg, 1000) == 16
    with pytest.raises(ValueError, match=r"lower finetune\.batch_size"):
        check_batch_arithmetic(cfg, 100, name="sel", path="x.jsonl")
    with pytest.raises(ValueError, match=r"batch_size=128 is not divisible by micro_batch_size=3"):
        check_batch_arithmetic(FinetuneConfig(batch_size=128, micro_batch_size=3, num_workers=1), 1000)


def test_epochs_by_run_applies_to_its_run_only(tmp_path):
    from selectmoe.stages.finetune import _run_name, run_config

    files = {"selected": "sel.jsonl", "full_pool": "pool.jsonl"}
    cfg = FinetuneConfig(train_files=files, epochs=10, epochs_by_run={"full_pool": 1})
    assert (run_config(cfg, "selected").epochs, run_config(cfg, "full_pool").epochs) == (10, 1)
    # the override is not part of the other runs' identity: adding it reruns nothing else
    plain = FinetuneConfig(train_files=files, epochs=10)
    named = [_run_name(run_config(c, "selected"), "selected", "sel.jsonl", False) for c in (cfg, plain)]
    assert named[0] == named[1]
    typo = FinetuneConfig(train_files=files, epochs_by_run={"full": 1}, output_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"finetune\.epochs_by_run\.full: no such run"):
        run_finetune(typo)


def test_missing_selection_file_is_an_error(tmp_path):
    cfg = FinetuneConfig(train_files={"sel": str(tmp_path / "nope.jsonl")}, output_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        run_finetune(cfg)


def test_pad_token_added_embeddings_resized_and_frozen(tiny_target, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_target)
    tok.pad_token = None
    base = tmp_path / "nopad"
    tok.save_pretrained(base)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_target).save_pretrained(base)
    cfg = FinetuneConfig(base_model=str(base))
    tokenizer, added = prepare_tokenizer(cfg)
    assert added and tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == len(tokenizer) - 1
    factory = LoraModelFactory(
        str(base), 4, 8, 0.0, ["q_proj", "v_proj"], len(tokenizer), tokenizer.pad_token_id
    )
    model = factory()
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("embed" in k or "lm_head" in k for k in export_lora(model))


def _trained_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from selectmoe.training.loop import TRAINABLE_FILE

    ckpt = json.loads((run_dir / "_manifest.json").read_text())["extra"]["checkpoint"]
    return load_file(str(Path(ckpt) / TRAINABLE_FILE))


def test_a_finished_run_survives_any_number_of_reruns(ray_local, tiny_target, tmp_path):
    """Rerunning a finished run (same name, same storage) restores it instead of training; its one final
    checkpoint must outlive every rerun. Re-reporting that checkpoint under its own directory name made
    the second rerun's num_to_keep delete the directory as the oldest result (FileNotFoundError)."""
    sel = write_selection(tmp_path / "selected_data.jsonl", 16)
    cfg = _cfg(tmp_path, tiny_target, sel, epochs=1)
    first = run_finetune(cfg).runs["sel"]
    want = _trained_tensors(Path(cfg.output_dir) / "sel")
    checkpoint = Path(
        json.loads((Path(cfg.output_dir) / "sel" / "_manifest.json").read_text())["extra"]["checkpoint"]
    )
    for _ in range(2):  # the second rerun deleted it
        again = run_finetune(cfg).runs["sel"]
        assert checkpoint.is_dir()
        assert (again.steps, again.last_loss) == (first.steps, first.last_loss) == (2, first.losses[-1][1])
        got = _trained_tensors(Path(cfg.output_dir) / "sel")
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert sorted(p.name for p in checkpoint.parent.glob("checkpoint_0*")) == [checkpoint.name]


@pytest.mark.pinned
def test_logged_losses_are_pinned(trained):
    """The seeded tiny run is bit-reproducible on CPU: its logged losses are pinned (16 steps, 2 epochs)."""
    _, result = trained
    losses = [round(loss, 4) for _, loss in result.runs["sel"].losses]
    assert losses == PINNED_LOSSES


@pytest.mark.slow
def test_killed_mid_epoch_resume_equals_uninterrupted_run(trained, tiny_target, tmp_path, monkeypatch):
    """Rank 0 dies after step 5 (epoch 1 of 2); Ray Train restarts from the step-3 checkpoint: the final
    LoRA tensors equal the uninterrupted run's bit for bit."""
    from selectmoe.training.loop import FAIL_ONCE_ENV

    cfg, result = trained
    marker = tmp_path / "failed.marker"
    monkeypatch.setenv(FAIL_ONCE_ENV, f"5:{marker}")
    resumed_cfg = _cfg(tmp_path, tiny_target, Path(cfg.train_files["sel"]), checkpoint_every=3)
    resumed = run_finetune(resumed_cfg)
    assert marker.exists(), "the injected failure never fired"
    assert resumed.runs["sel"].steps == 16
    want = _trained_tensors(Path(cfg.output_dir) / "sel")
    got = _trained_tensors(Path(resumed_cfg.output_dir) / "sel")
    assert want.keys() == got.keys() and want
    assert all(torch.equal(want[k], got[k]) for k in want)
    # the metrics log has every step once, with the uninterrupted run's values
    assert resumed.runs["sel"].losses == result.runs["sel"].losses


@pytest.mark.slow
def test_fsdp_trains_what_ddp_trains(trained, tiny_target, tmp_path, monkeypatch):
    """2 CPU workers over gloo: FSDP2 (one unit per decoder layer, killed once and restored from its
    checkpoint) and DDP train the same LoRA tensors within 1e-4; both match the 1-worker run, since every
    world size trains on the same global batches."""
    from selectmoe.training.loop import FAIL_ONCE_ENV

    cfg, _ = trained
    sel = Path(cfg.train_files["sel"])
    runs = {}
    for strategy in ("ddp", "fsdp"):
        if strategy == "fsdp":
            monkeypatch.setenv(FAIL_ONCE_ENV, f"5:{tmp_path / 'fsdp.marker'}")
        c = _cfg(tmp_path / strategy, tiny_target, sel, num_workers=2, strategy=strategy, checkpoint_every=3)
        run_finetune(c)
        runs[strategy] = _trained_tensors(Path(c.output_dir) / "sel")
    assert (tmp_path / "fsdp.marker").exists()
    single = _trained_tensors(Path(cfg.output_dir) / "sel")
    assert runs["ddp"].keys() == runs["fsdp"].keys() == single.keys()
    for k in single:
        torch.testing.assert_close(runs["fsdp"][k], runs["ddp"][k], rtol=0, atol=1e-4, msg=k)
        torch.testing.assert_close(runs["ddp"][k], single[k], rtol=0, atol=1e-4, msg=k)
    assert any(not torch.equal(runs["fsdp"][k], runs["ddp"][k]) for k in single)  # really another path
