"""`ServerConfig` and `freevlm serve`'s options: a bad value is refused naming the option, before a model loads."""

import argparse

import pytest

from freevlm.cli import main
from freevlm.commands import serve
from freevlm.decoding.config import DecodeConfig
from freevlm.server.config import ServerConfig
from freevlm.server.served import ServedModel


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("max_batch", 0, "max_batch must be a positive integer"),
        ("prefill_chunk", 0, "prefill_chunk must be a positive integer"),
        ("prefill_chunk", 2.5, "prefill_chunk must be a positive integer"),
        ("request_timeout", float("inf"), "request_timeout must be a positive number of seconds"),
        ("threshold", 1.5, "threshold must be in [0, 1]"),
        ("max_tokens", 300, "max_tokens=300 leaves no room for a prompt in max_len=256"),
    ],
)
def test_a_bad_option_is_refused_by_name(option, value, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        ServerConfig(**{option: value}).validate()


def test_the_command_refuses_a_bad_prefill_chunk(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["serve", "--prefill-chunk", "0"])
    assert exit.value.code == 2 and "--prefill-chunk" in capsys.readouterr().err


def test_every_flag_sets_its_field():
    """Each flag lands in its own `ServerConfig` field (a flag read into another field, or dropped, fails here)."""
    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    assert serve.server_config(parser.parse_args(["serve"])) == ServerConfig()
    given = {  # flag: (field, value), every value other than the default
        "--max-batch": ("max_batch", 3),
        "--max-len": ("max_len", 200),
        "--max-queue": ("max_waiting", 5),
        "--prefill-chunk": ("prefill_chunk", 7),
        "--threshold": ("threshold", 0.25),
        "--max-tokens": ("max_tokens", 11),
        "--prompt": ("prompt", "a drawing of"),
        "--request-timeout": ("request_timeout", 9.5),
        "--drain-seconds": ("drain_seconds", 4.5),
        "--max-image-bytes": ("max_image_bytes", 1000),
    }
    argv = ["serve", "--no-image-urls"] + [word for flag, (_, value) in given.items() for word in (flag, str(value))]
    config = serve.server_config(parser.parse_args(argv))
    expected = ServerConfig(**dict(given.values()), image_urls=False)
    assert config == expected


def test_the_default_threshold_and_where_it_comes_from():
    """`--threshold`, else the one certified for the model's exits, else the library's; 1.0 without exits."""

    def served(threshold: float | None, has_exits: bool = True) -> ServedModel:
        return ServedModel(None, None, "m", has_exits=has_exits, exit_layers=(1,), threshold=threshold)

    threshold, source = ServerConfig().default_threshold(served(0.7))
    assert threshold == 0.7 and source == "certified (Learn-then-Test) for exits [1], recorded with the model"
    assert ServerConfig(threshold=0.4).default_threshold(served(0.7))[0] == 0.4
    assert ServerConfig().default_threshold(served(None))[0] == DecodeConfig.threshold
    assert ServerConfig(threshold=0.4).default_threshold(served(0.7, has_exits=False))[0] == 1.0
