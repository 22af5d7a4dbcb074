"""`ServerConfig` and `freevlm serve`'s options: a bad value is refused naming the option, before a model loads."""

import pytest

from freevlm.cli import main
from freevlm.server.config import ServerConfig


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
