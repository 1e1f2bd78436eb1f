"""Score stage: scoring values, exact id coverage, idempotent reruns, resume after a killed actor / job."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny_words import WORDS

from selectmoe.config import ScoreConfig
from selectmoe.data.records import prompt_key
from selectmoe.router_data import load_router_data

MAX_LENGTH = 40  # small, so some samples get truncated (flagged, never dropped)


def _record(i: int, rng: np.random.Generator, prefix: str) -> dict:
    n_user, n_asst = int(rng.integers(2, 12)), int(rng.integers(2, 30))
    return {
        "dataset": f"ds{i % 2}",
        "id": f"{prefix}-{i}",
        "messages": [
            {"role": "user", "content": " ".join(rng.choice(WORDS, n_user))},
            {"role": "assistant", "content": " ".join(rng.choice(WORDS, n_asst))},
        ],
    }


@pytest.fixture(scope="module")
def artefact(tmp_path_factory):
    """A tiny Select-MoE selector artefact (non-default EncodingSpec) and a 3-file pool with bad rows."""
    from selectmoe.data.encoding import EncodingSpec
    from selectmoe.model import save_selector
    from selectmoe.model.tiny import build_tiny_select_moe, train_bpe_tokenizer

    root = tmp_path_factory.mktemp("score")
    rng = np.random.default_rng(0)
    pool = root / "pool"
    pool.mkdir()
    files, texts = [], []
    for f, n in enumerate((9, 7, 5)):
        lines = [json.dumps(_record(i, rng, f"f{f}")) for i in range(n)]
        texts += [" ".join(m["content"] for m in json.loads(x)["messages"]) for x in lines]
        if f == 1:  # one unparsable line and one row without an assistant turn
            lines.insert(2, "{not json")
            lines.append(
                json.dumps({"dataset": "ds0", "id": "bad", "messages": [{"role": "user", "content": "x"}]})
            )
        path = pool / f"part{f}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        files.append(str(path))
    tokenizer = train_bpe_tokenizer([*texts, "<|user|>\n <|assistant|>\n <|system|>\n"] * 4, vocab_size=600)
    model = build_tiny_select_moe(tokenizer, seed=0)
    base = root / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    from selectmoe.model import export_trainable

    selector = root / "selector"
    save_selector(
        selector,
        base_model_dir=str(base),
        trainable_mode="full_rank",
        tensors=export_trainable(model),
        encoding=EncodingSpec(max_length=MAX_LENGTH).to_dict(),
        tokenizer=tokenizer,
    )
    from selectmoe.data.ingest import ingest_pool

    ingest_pool(files, root / "ingest")  # the ingest stage; score reads its shards and never ingests
    return {"root": root, "pool": files, "model_dir": str(selector), "n_valid": 9 + 7 + 5}


def _cfg(artefact, name: str, **kw) -> ScoreConfig:
    root = artefact["root"]
    return ScoreConfig(
        model_dir=artefact["model_dir"],
        ingest_dir=str(root / "ingest"),
        output_dir=str(root / name),
        batch_size=4,
        num_replicas=1,
        use_gpu=None,
        dtype="auto",
        sort_window=8,
        **kw,
    )


def _ingest_ids(ingest_dir: Path) -> list[str]:
    from selectmoe.data.ingest import list_shards

    return [
        i for p in list_shards(ingest_dir) for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()
    ]


def _mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((out / "shards").glob("*"))}


def test_score_without_ingest_fails_in_one_line_before_ray(artefact, tmp_path):
    import ray

    from selectmoe.stages.score import run_score

    cfg = _cfg(artefact, "unused")
    cfg.ingest_dir, cfg.output_dir = str(tmp_path / "ingest"), str(tmp_path / "router")
    ray_was_up = ray.is_initialized()  # False when this file runs alone
    with pytest.raises(FileNotFoundError) as err:
        run_score(cfg)
    assert str(err.value) == (
        f"score: needs the ingested pool at {tmp_path}/ingest/shards (run: selectmoe run CONFIG --only ingest)"
    )
    assert ray.is_initialized() == ray_was_up and not (tmp_path / "router").exists()


def test_score_batch_same_alone_and_padded(artefact):
    """The scoring function gives a sample the same scores alone and inside a right-padded batch."""
    from selectmoe.data.encoding import ChatEncoder, EncodingSpec
    from selectmoe.scoring.scorer import RouterScorer

    scorer = RouterScorer(artefact["model_dir"], dtype="float32", use_gpu=False)
    from transformers import AutoTokenizer

    encoder = ChatEncoder(AutoTokenizer.from_pretrained(artefact["model_dir"]), EncodingSpec(max_length=256))
    rng = np.random.default_rng(1)
    encs = [encoder.encode(_record(i, rng, "p")["messages"]) for i in range(4)]
    assert len({e.n_tokens for e in encs}) > 1  # really padded

    def table(items):
        return pa.table(
            {
                "id": [f"p{i}" for i in range(len(items))],
                "dataset": ["d"] * len(items),
                "n_tokens": pa.array([e.n_tokens for e in items], pa.int32()),
                "truncated": [e.truncated for e in items],
                "full_tokens": pa.array([e.full_tokens for e in items], pa.int32()),
                "_shard": ["s"] * len(items),
                "input_ids": pa.array([e.input_ids for e in items], pa.list_(pa.int32())),
                "labels": pa.array([e.labels for e in items], pa.list_(pa.int32())),
            }
        )

    batch = scorer(table(encs))
    for i, e in enumerate(encs):
        alone = scorer(table([e]))
        for col in ("quality", "quality_layers"):
            a = np.asarray(alone.column(col).to_pylist(), np.float32)[0]
            b = np.asarray(batch.column(col).to_pylist(), np.float32)[i]
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
        a = np.asarray(alone.column("routing").to_pylist(), np.float32)[0]
        b = np.asarray(batch.column("routing").to_pylist(), np.float32)[i]
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=0)  # stored fp16

    # and score_batch itself (fp32, before the fp16 storage cast) on the encoder's own padding
    from selectmoe.data.encoding import pad_batch
    from selectmoe.scoring.model import score_batch

    padded = pad_batch(encs, scorer.pad_id)
    full = score_batch(
        scorer.model, padded["input_ids"], padded["attention_mask"], padded["labels"], scope=scorer.scope
    )
    for i, e in enumerate(encs):
        one = pad_batch([e], scorer.pad_id)
        single = score_batch(
            scorer.model, one["input_ids"], one["attention_mask"], one["labels"], scope=scorer.scope
        )
        for key in ("quality", "quality_layers", "routing"):
            np.testing.assert_allclose(single[key][0], full[key][i], atol=1e-5, rtol=0)


PINNED_TRUNCATED, PINNED_WARNINGS = 7, 2  # fixture rows cut at MAX_LENGTH (of 21); datasets over 5% cut


@pytest.mark.slow
def test_run_score_kill_resume_values_rerun_and_partial_redo(artefact, ray_local, monkeypatch):
    """One flow (each Ray Data run costs seconds): a killed actor + a killed job, the resume, the values,
    a rerun that scores nothing, and a deleted output shard that alone is redone."""
    from selectmoe.data.ingest import list_shards
    from selectmoe.stages.score import CRASH_ONCE_ENV, STOP_AFTER_ENV, ScoreInterrupted, run_score

    cfg = _cfg(artefact, "router")
    out = Path(cfg.output_dir)
    ingest_ids = None

    # 1. the first scorer batch kills its actor (Ray restarts it and retries the task), and the driver
    #    dies after the first finished shard
    marker = artefact["root"] / "crash.marker"
    monkeypatch.setenv(CRASH_ONCE_ENV, str(marker))
    monkeypatch.setenv(STOP_AFTER_ENV, "1")
    with pytest.raises(ScoreInterrupted):
        run_score(cfg)
    assert marker.exists()  # the actor really died once
    assert len(list((out / "shards").glob("*.done.json"))) == 1
    assert not list((out / "shards").glob("*.tmp"))  # no half shard left behind
    assert not (out / "_manifest.json").exists()

    # 2. the rerun resumes: only the two unfinished shards are scored
    monkeypatch.delenv(STOP_AFTER_ENV)
    res = run_score(cfg)
    summary = res.summary()
    assert summary["shards_scored"] == 2 and summary["shards_skipped"] == 1
    assert res.rows == artefact["n_valid"] and 0 < res.rows_scored < res.rows
    assert res.tokens_scored > 0 and res.tokens_per_s > 0

    # rejected rows: listed by ingest with file/line/reason, counted here and in the manifest
    assert res.rejected == 2
    rejected = [json.loads(x) for x in Path(res.rejected_path).read_text().splitlines() if x.strip()]
    assert len(rejected) == 2
    assert all(r["file"].endswith("part1.jsonl") and r["line"] and r["reason"] for r in rejected)
    assert sorted(r["line"] for r in rejected) == [3, 9]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["stage"] == "score"
    assert manifest["counts"]["rejected"] == 2 and manifest["counts"]["rows"] == artefact["n_valid"]
    assert manifest["extra"]["model_fingerprint"] == res.model_fingerprint

    # exact coverage: one output shard per ingest shard, ids == ingest ids, no duplicates, no gaps
    ingest_ids = _ingest_ids(Path(cfg.ingest_dir))
    data = load_router_data(out, features=True)
    assert len(data) == len(ingest_ids) == artefact["n_valid"]
    assert len(set(data.ids)) == len(data.ids) and set(data.ids) == set(ingest_ids)
    assert [p.name for p in data.shards] == [p.name for p in list_shards(cfg.ingest_dir)]

    # values: quality in (0, 1) and the mean of its layers; routing rows sum to 1 per layer
    L, E = data.num_layers, data.num_experts
    assert np.all((data.quality > 0) & (data.quality < 1))
    np.testing.assert_allclose(data.quality, data.quality_layers.mean(axis=1), atol=1e-6)
    sums = np.asarray(data.routing, np.float32).reshape(-1, L, E).sum(-1)
    np.testing.assert_allclose(sums, 1.0, atol=E * 1e-3)
    # the stored response NLL of an id == a direct forward's mean NLL over its assistant tokens
    hf_loss = _direct_nll(artefact)
    shard = list_shards(cfg.ingest_dir)[0]
    pool_rows = pq.read_table(shard, columns=["id", "messages"]).to_pylist()
    stored = dict(zip(data.ids, data.response_nll.tolist()))
    stored_ifd = dict(zip(data.ids, data.ifd.tolist()))  # score.ifd is on by default
    for row in pool_rows[:3]:
        messages = json.loads(row["messages"])
        want = hf_loss(messages, "assistant_only")
        assert stored[row["id"]] == pytest.approx(want, abs=1e-5)
        answer = hf_loss([m for m in messages if m["role"] == "assistant"], "assistant_only")
        assert stored_ifd[row["id"]] == pytest.approx(want / answer, rel=1e-5)
    # the stored prompt key of every row of the shard == prompt_key of its messages (int64, exact)
    stored_keys = pa.concat_tables([pq.read_table(p, columns=["prompt_key"]) for p in data.shards])
    keys = dict(zip(data.ids, stored_keys["prompt_key"].to_pylist()))
    assert {r["id"]: keys[r["id"]] for r in pool_rows} == {
        r["id"]: prompt_key(json.loads(r["messages"])) for r in pool_rows
    }
    # every stored quality / response NLL of a shard == score_batch run directly on that id alone
    direct = _direct_score_batch(artefact)
    quality = dict(zip(data.ids, data.quality.tolist()))
    for row in pool_rows:
        want = direct(json.loads(row["messages"]))
        assert quality[row["id"]] == pytest.approx(want["quality"], abs=1e-6), row["id"]
        assert stored[row["id"]] == pytest.approx(want["response_nll"], abs=1e-5), row["id"]
    # truncation per dataset: counted from the stored flags, in the result and the manifest
    names, want_trunc = np.asarray(data.datasets), {}
    full = np.concatenate(
        [pq.read_table(p, columns=["full_tokens"])["full_tokens"].to_numpy() for p in data.shards]
    )
    n_tokens = np.asarray(data.n_tokens)
    assert (full[~data.truncated] == n_tokens[~data.truncated]).all() and (
        full[data.truncated] > MAX_LENGTH
    ).all()
    for ds in sorted(set(names)):
        n, t = int((names == ds).sum()), int(data.truncated[names == ds].sum())
        keep = int(np.quantile(full[names == ds], 0.9, method="higher"))
        want_trunc[ds] = {"rows": n, "truncated": t, "share": round(t / n, 4), "keep_length": keep}
    assert res.truncation["datasets"] == manifest["extra"]["truncation"]["datasets"] == want_trunc
    assert manifest["counts"]["truncated"] == int(data.truncated.sum()) == PINNED_TRUNCATED
    assert (
        len(res.truncation["warnings"])
        == sum(c["share"] > 0.05 for c in want_trunc.values())
        == PINNED_WARNINGS
    )
    assert np.isfinite(data.ifd).all()
    # the selector's EncodingSpec (max_length=40) was used: lengths capped and truncation flagged
    assert data.n_tokens.max() <= MAX_LENGTH and data.truncated.any() and not data.truncated.all()
    assert np.all(data.n_tokens[data.truncated] == MAX_LENGTH)

    # 3. rerun: nothing rescored, files untouched
    before = _mtimes(out)
    res2 = run_score(cfg)
    assert res2.summary()["shards_scored"] == 0 and len(res2.shards_skipped) == 3 and res2.rows_scored == 0
    assert _mtimes(out) == before

    # 4. delete one output shard -> exactly that shard is redone
    victim = sorted((out / "shards").glob("*.parquet"))[1]
    victim.unlink()
    res3 = run_score(cfg)
    assert res3.shards_scored == [victim.name.removesuffix(".parquet")]
    after = _mtimes(out)
    changed = {k for k in after if after[k] != before.get(k)}
    assert changed == {victim.name, victim.name.removesuffix(".parquet") + ".done.json"}
    data3 = load_router_data(out, features=True)
    assert len(data3.ids) == len(set(data3.ids)) and sorted(data3.ids) == sorted(ingest_ids)


def _encoded_window(artefact, records, *, ifd: bool) -> pa.Table:
    """The score stage's own CPU stage (encoder + response labels + buckets) over ``records``."""
    from selectmoe.model.artifact import selector_tokenizer_dir
    from selectmoe.scoring.dataset import encode_and_bucket, read_encoding_spec

    table = pa.table(
        {
            "id": [r["id"] for r in records],
            "dataset": [r["dataset"] for r in records],
            "messages": [json.dumps(r["messages"]) for r in records],
            "_shard": ["s"] * len(records),
        }
    )
    blocks = list(
        encode_and_bucket(
            table,
            tokenizer_dir=str(selector_tokenizer_dir(artefact["model_dir"])),
            spec=read_encoding_spec(artefact["model_dir"]),
            batch_size=64,
            ifd=ifd,
        )
    )
    return pa.concat_tables(blocks)


def _direct_nll(artefact):
    """``f(messages, label_mode)``: mean next-token NLL from a plain forward of the selector (its logits,
    shifted, torch's cross-entropy over the labelled tokens) -- independent of the score stage's code."""
    import torch

    from selectmoe.data.encoding import ChatEncoder, EncodingSpec
    from selectmoe.model import load_selector

    model, tokenizer, enc = load_selector(artefact["model_dir"], dtype=torch.float32, device="cpu")
    model.eval()
    spec = EncodingSpec.from_dict(enc)
    by_mode = {
        m: ChatEncoder(tokenizer, EncodingSpec(spec.max_length, m))
        for m in ("assistant_only", "full_sequence")
    }

    def hf_loss(messages, mode):
        # the model's own loss would add the router/quality aux terms: take its logits, shift, mean CE
        e = by_mode[mode].encode(messages)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
        return float(torch.nn.functional.cross_entropy(logits, torch.tensor(e.labels[1:]), ignore_index=-100))

    return hf_loss


def _direct_score_batch(artefact):
    """``f(messages) -> {"quality", "response_nll"}``: :func:`score_batch` on one unpadded sample, fp32."""
    import torch

    from selectmoe.data.encoding import ChatEncoder, EncodingSpec, pad_batch
    from selectmoe.model import load_selector
    from selectmoe.scoring.model import response_spec, score_batch

    model, tokenizer, enc = load_selector(artefact["model_dir"], dtype=torch.float32, device="cpu")
    model.eval()
    encoder = ChatEncoder(tokenizer, EncodingSpec.from_dict(enc))
    response = ChatEncoder(tokenizer, response_spec(enc))

    def score(messages):
        batch = pad_batch([encoder.encode(messages)], tokenizer.pad_token_id)
        labels = pad_batch([response.encode(messages)], tokenizer.pad_token_id)["labels"]
        out = score_batch(model, **batch, scope=model.config.quality_token_scope, response_labels=labels)
        return {k: float(out[k][0]) for k in ("quality", "response_nll")}

    return score


def test_response_and_sample_nll_equal_a_direct_hf_forward(artefact):
    """Stored response NLL == HF's own causal-LM loss with labels on the assistant tokens only (and the
    sample NLL == the loss with every token labelled); IFD == L(A|Q) / HF loss of the answer alone."""

    from selectmoe.scoring.scorer import RouterScorer

    rng = np.random.default_rng(3)
    records = [_record(i, rng, "n") for i in range(6)]
    records[0]["messages"].insert(0, {"role": "system", "content": "be brief"})
    scored = RouterScorer(artefact["model_dir"], dtype="float32", use_gpu=False)(
        _encoded_window(artefact, records, ifd=True)
    )
    got = {
        c: dict(zip(scored.column("id").to_pylist(), scored.column(c).to_pylist()))
        for c in scored.column_names
    }

    hf_loss = _direct_nll(artefact)
    for r in records:
        want_resp = hf_loss(r["messages"], "assistant_only")
        want_answer = hf_loss([m for m in r["messages"] if m["role"] == "assistant"], "assistant_only")
        assert got["response_nll"][r["id"]] == pytest.approx(want_resp, abs=1e-5)
        assert got["sample_nll"][r["id"]] == pytest.approx(hf_loss(r["messages"], "full_sequence"), abs=1e-5)
        assert got["ifd"][r["id"]] == pytest.approx(want_resp / want_answer, abs=1e-5)
    # a response (not the prompt) really is what response_nll measures: the two differ on every sample
    assert all(abs(got["response_nll"][i] - got["sample_nll"][i]) > 1e-3 for i in got["id"])


def test_cpu_replica_plan_never_asks_for_more_than_the_cluster_has():
    """Issue 25: score on a 1-CPU `ray start --head` sat forever in `backpressured:tasks(ResourceBudget)` (the
    replica held the CPU a read task needs); 8 replicas on 2 CPUs did the same. Now: fitted or refused."""
    from selectmoe.scoring.dataset import cpu_replica_plan

    assert cpu_replica_plan(2.0, 1) == (1, 1.0, [])  # today's plan where it fits: unchanged
    assert cpu_replica_plan(2.0, 2) == (2, 0.5, [])
    assert cpu_replica_plan(2.0, 8) == (
        4,
        0.25,
        ["score.num_replicas=8: the Ray cluster has 2 CPU(s); running 4 replicas"],
    )
    assert cpu_replica_plan(16.0, 4) == (4, 1.0, [])
    with pytest.raises(ValueError, match=r"^score.num_replicas: the Ray cluster has 1 CPU\(s\); CPU scoring"):
        cpu_replica_plan(1.0, 1)


def test_a_lone_cpu_replica_uses_every_cpu_of_its_node(ray_local):
    """One replica on the 2-CPU cluster runs 2 torch threads (the encode tasks' CPU idles between their
    bursts); several share the CPUs the encode tasks leave; threads never exceed a node's CPUs."""
    from selectmoe.config import ScoreConfig
    from selectmoe.scoring.dataset import replica_resources

    def threads(replicas: int) -> int:
        return replica_resources(ScoreConfig(num_replicas=replicas), use_gpu=False)[2]

    assert (threads(1), threads(2), threads(4)) == (2, 1, 1)
