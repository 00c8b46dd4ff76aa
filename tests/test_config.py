import argparse
from dataclasses import dataclass

import pytest

from gptfluence.config import add_arguments, arg, from_dict, from_namespace, load_config, save_json, to_dict
from gptfluence.errors import InputError


@dataclass
class Cfg:
    lr: float = arg(1e-3, "learning rate")
    steps: int = arg(10, "steps")
    name: str = arg("x", "name")
    flag: bool = arg(False, "a flag")
    ids: list[int] = arg([1, 2], "ids")


def test_round_trip_and_errors(tmp_path):
    c = Cfg(lr=0.5, ids=[3])
    save_json(c, tmp_path / "c.json")
    assert load_config(Cfg, tmp_path / "c.json") == c
    with pytest.raises(InputError, match=r"c.json: unknown field 'lrr'"):
        from_dict(Cfg, {"lrr": 1}, "c.json")
    with pytest.raises(InputError, match=r"c.json, field 'steps': expected an integer"):
        from_dict(Cfg, {"steps": "ten"}, "c.json")
    with pytest.raises(InputError, match=r"c.json, field 'ids'\[1\]: expected an integer"):
        from_dict(Cfg, {"ids": [1, "a"]}, "c.json")
    (tmp_path / "bad.json").write_text('{\n "lr": ,\n}')
    with pytest.raises(InputError, match="bad.json line 2: invalid JSON"):
        load_config(Cfg, tmp_path / "bad.json")


def test_cli_flags_override_base():
    p = argparse.ArgumentParser()
    add_arguments(p, Cfg)
    ns = p.parse_args(["--steps", "5", "--flag", "--ids", "4", "5"])
    c = from_namespace(Cfg, ns, Cfg(name="base"))
    assert to_dict(c) == {"lr": 1e-3, "steps": 5, "name": "base", "flag": True, "ids": [4, 5]}


def test_percent_sign_in_help_text_is_shown_literally(capsys):
    @dataclass
    class WithPercent:
        rate: float = arg(0.5, "up to 17 % higher (50% by default)")

    parser = argparse.ArgumentParser()
    add_arguments(parser, WithPercent)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    assert "17 % higher (50% by default)" in " ".join(capsys.readouterr().out.split())


def test_every_subcommand_help_renders(capsys):
    """`gptfluence COMMAND --help` must print, not crash inside argparse (a '%' in a help text once did)."""
    from gptfluence.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert len(sub.choices) >= 10
    for name, subparser in sub.choices.items():
        text = subparser.format_help()
        assert "usage:" in text, name
