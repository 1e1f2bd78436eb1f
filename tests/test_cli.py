"""The CLI explains itself: every option in --help, overrides and -v anywhere, config mistakes in one or
two lines naming the key (exit 2), and a package import that loads nothing heavy. No Ray, no model."""

from __future__ import annotations

import dataclasses
import enum
import os
import subprocess
import sys
from pathlib import Path

import omegaconf
import pytest

from selectmoe.cli import main, parse_args
from selectmoe.config_errors import explain, nearest_key

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("validate", ["FILE", "--out", "--strict", "--format", "--max-chars"]),
        ("select", ["CONFIG|ROUTER_DIR", "--batch", "--pool-dir", "--out", "--force", "key=value"]),
        ("probe", ["model_dir", "pool", "--n", "--seed", "--batch-size", "--format"]),
        ("run", ["config", "--only", "--from", "--force", "key=value"]),
        ("demo", ["--out", "--force", "key=value"]),
        (
            "convert",
            ["src", "dst", "--gate-init-bias", "--gate-init-std", "--trash-expert-mode", "--no-verify"],
        ),
        ("evaluate", ["config", "--force", "key=value"]),
        ("eval", ["config", "--force", "key=value"]),
        ("report", ["CONFIG|ROUTER_DIR", "--out", "key=value"]),
        ("tune", ["config", "key=value"]),
    ],
)
def test_help_of_each_command_lists_its_options(command, options, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    missing = [o for o in [*options, "--verbose"] if o not in shown]
    assert missing == [], f"`selectmoe {command} --help` does not show {missing}:\n{shown}"


def test_overrides_anywhere_after_the_command_in_order():
    args = parse_args(["run", "demo", "--only", "ingest", "data.format=x"])
    assert (args.config, args.only, args.overrides) == ("demo", ["ingest"], ["data.format=x"])
    args = parse_args(["run", "a.b=1", "demo", "--only", "score", "select", "a.b=2", "--force", "x[0]=3"])
    assert (args.config, args.only, args.force) == ("demo", ["score", "select"], True)
    assert args.overrides == ["a.b=1", "a.b=2", "x[0]=3"]  # later wins in load_config: order kept


def test_option_values_and_files_with_equals_are_not_overrides():
    args = parse_args(["demo", "--out", "runs/lr=3e-4", "warmup.lr=3e-4"])
    assert (args.out, args.overrides) == ("runs/lr=3e-4", ["warmup.lr=3e-4"])
    # validate takes no overrides: a file named k=v.jsonl stays a file
    assert parse_args(["validate", "k=v.jsonl", "--out", "d"]).files == ["k=v.jsonl"]


def test_a_stray_argument_is_an_error_not_dropped(capsys):
    with pytest.raises(SystemExit) as done:
        parse_args(["run", "demo", "extra", "a=1"])
    assert done.value.code == 2
    assert "unrecognized arguments: extra (overrides are key=value)" in capsys.readouterr().err


def test_override_after_only_is_not_taken_as_a_stage(capsys):
    assert main(["run", "demo", "--only", "polish", "data.format=alpaca"]) == 2
    err = capsys.readouterr().err
    assert "unknown stage(s) ['polish']" in err and "data.format" not in err


@pytest.mark.parametrize(
    ("argv", "verbose"),
    [
        (["presets"], False),
        (["-v", "presets"], True),
        (["presets", "-v"], True),
        (["run", "demo", "--verbose"], True),
    ],
)
def test_verbose_before_or_after_the_command(argv, verbose):
    assert parse_args(argv).verbose is verbose


def test_evaluate_command_with_eval_alias():
    assert parse_args(["evaluate", "demo"]).command == "evaluate"
    assert parse_args(["eval", "demo", "-v"]).command == "evaluate"


def test_select_needs_exactly_one_target(capsys):
    assert main(["select"]) == 2
    assert (
        capsys.readouterr().err
        == "selectmoe select: error: give exactly one of CONFIG, ROUTER_DIR or --batch ROOT\n"
    )


def test_select_with_a_config_refuses_router_dir_options(capsys):
    assert main(["select", "demo", "--out", "x"]) == 2
    assert "--pool-dir/--out apply to a ROUTER_DIR" in capsys.readouterr().err


def test_a_missing_stage_input_is_not_blamed_on_the_preset():
    missing = FileNotFoundError("pool file /data/x.jsonl does not exist")
    assert explain(missing, source="demo", presets=["demo"]) is None
    assert explain(missing, source="dmeo", presets=["demo"]) is None  # about another file
    unknown = FileNotFoundError("no config file or preset named 'dmeo' (presets: demo)")
    assert explain(unknown, source="dmeo", presets=["demo"]).endswith("; did you mean demo?")


class Policy(enum.Enum):
    top_k = "top_k"
    random = "random"


@dataclasses.dataclass
class _Stage:
    source: str = omegaconf.MISSING
    policy: Policy = Policy.top_k


def _raised(overrides: list[str]) -> Exception:
    with pytest.raises(Exception) as caught:
        merged = omegaconf.OmegaConf.merge(
            omegaconf.OmegaConf.structured(_Stage), omegaconf.OmegaConf.from_dotlist(overrides)
        )
        omegaconf.OmegaConf.to_object(merged)
    return caught.value


def test_enum_choices_and_missing_values_as_omegaconf_raises_them():
    """The forms a config with enums and `???` fields raises (OmegaConf's own exceptions, not ours)."""
    bad = _raised(["source=/m", "policy=nope"])
    assert explain(bad, overrides=["policy=nope"]) == "policy=nope: not one of [top_k, random]"
    missing = _raised([])
    assert explain(missing, source="mine.yaml") == (
        "mandatory value source is not set (`???` in mine.yaml); give source=..."
    )


def test_nearest_key():
    keys = ["lr", "lora_r", "lora_alpha", "lora_dropout", "label_mode", "log_every", "max_length"]
    assert nearest_key("lr_typo", keys) == "lr"  # difflib alone (cutoff 0.4) says lora_dropout
    assert nearest_key("k_rnge", ["k", "k_range", "k_choice"]) == "k_range"  # not the prefix k
    assert nearest_key("lora_alhpa", keys) == "lora_alpha"
    assert nearest_key("zzz", keys) is None


CONFIG_MISTAKES = [
    (["config", "demo", "warmup.lr_typo=1"], "unknown key warmup.lr_typo; did you mean warmup.lr?"),
    (["run", "demo", "--only", "select", "warmpu.lr=1"], "unknown key warmpu; did you mean warmup?"),
    (
        ["config", "demo", "select.k_range=[4"],
        "select.k_range: the value in 'select.k_range=[4' is not valid YAML (did not find expected ',' or ']')",
    ),
    (["config", "demo", "data.pool=/x"], "data.pool is a list: write data.pool=[/x]"),
    (["config", "demo", "warmup.lr=abc"], "warmup.lr=abc: expected a number"),
    (["config", "demo", "seed=1.5"], "seed=1.5: expected an integer"),
    (["config", "dmeo"], "; did you mean demo?"),
    (["config", "demo.yml"], "; did you mean demo?"),
    (["config", "nope"], "no config file or preset named 'nope' (presets: demo, "),
    (["run", "olmoe_less"], "convert.source"),
    (["config", "demo", "select.policy=nope"], "select.policy"),
    (["config", "demo", "output_dir=${nope}"], "output_dir: Interpolation key 'nope' not found"),
]


@pytest.mark.parametrize(("argv", "expected"), CONFIG_MISTAKES, ids=[" ".join(a) for a, _ in CONFIG_MISTAKES])
def test_config_mistakes_name_the_key_in_two_lines(argv, expected, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert 1 <= len(lines) <= 2 and captured.out == "", captured.err
    assert lines[0].startswith(f"selectmoe {argv[0]}: error: ") and expected in captured.err


def test_bad_choice_lists_the_choices(capsys):
    assert main(["config", "demo", "select.policy=nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "quality_round_robin" in err and "proportional" in err


def test_select_config_keys_of_a_router_dir_are_checked_too(tmp_path, capsys):
    assert main(["select", str(tmp_path), "--pool-dir", str(tmp_path), "k_typo=3"]) == 2
    assert capsys.readouterr().err == "selectmoe select: error: unknown key k_typo; did you mean k?\n"


def test_mistakes_in_a_yaml_file_name_file_line_or_key(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("seed: 1\nselect:\n  k_range: [4\n  k: 3\n")
    assert main(["config", str(broken)]) == 2
    assert capsys.readouterr().err.startswith(f"selectmoe config: error: {broken}:4: invalid YAML (")
    typo = tmp_path / "typo.yaml"
    typo.write_text("select:\n  k_rnge: [3, 5]\n")
    assert main(["config", str(typo)]) == 2
    assert capsys.readouterr().err == (
        "selectmoe config: error: unknown key select.k_rnge; did you mean select.k_range?\n"
    )


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_import_and_help_load_nothing_heavy():
    code = (
        "import sys, contextlib, io\n"
        "import selectmoe, selectmoe.cli\n"
        "selectmoe.cli.build_parser()\n"
        "for argv in (['--help'], ['validate', '--help'], ['run', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        selectmoe.cli.main(argv)\n"
        "heavy = ('torch', 'transformers', 'ray', 'pyarrow', 'numpy', 'omegaconf')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    done = _python(code)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr


def test_the_installed_entry_point_exits_2_without_a_traceback():
    done = _python(
        "import sys, selectmoe.cli; sys.exit(selectmoe.cli.main(['config', 'demo', 'warmup.lr_typo=1']))"
    )
    assert done.returncode == 2
    assert done.stderr == "selectmoe config: error: unknown key warmup.lr_typo; did you mean warmup.lr?\n"
