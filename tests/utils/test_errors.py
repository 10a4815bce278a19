"""medtune.utils.errors: one line per user error (one test per class), bugs keep their traceback."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torchtune import config

from medtune.data.errors import DataError, MissingFieldError
from medtune.utils.errors import UserError, run_entry


@pytest.fixture(autouse=True)
def _no_traceback_env(monkeypatch):
    monkeypatch.delenv("MEDTUNE_TRACEBACK", raising=False)


def _fails(fn, capsys, status=1) -> str:
    """Run ``fn`` under run_entry; assert the status and one stderr line; return that line."""
    assert run_entry("prog", fn) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _raise(exc):
    def fn():
        raise exc

    return fn


def _recipe(tmp_path, monkeypatch, yaml_text: str, *overrides: str, body=None):
    """A ``@config.parse`` entry point over ``yaml_text``, with sys.argv set as the CLI does."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml_text)
    monkeypatch.setattr(sys, "argv", ["recipe.py", "--config", str(path), *overrides])

    @config.parse
    def main(cfg):
        return body(cfg) if body else 0

    return main


# ----------------------------------------------------------------------------- the policy


def test_user_error_is_one_line_and_status_1(capsys):
    assert (
        _fails(_raise(UserError("data.json row 3: bad")), capsys)
        == "prog: error: data.json row 3: bad"
    )


def test_data_error_is_a_user_error_and_still_a_value_error(capsys):
    err = MissingFieldError("missing field 'question'", file="a.json", row=2)
    assert isinstance(err, UserError) and isinstance(err, ValueError)
    assert _fails(_raise(err), capsys) == "prog: error: a.json row 2: missing field 'question'"


def test_multiline_user_message_becomes_one_line(capsys):
    assert _fails(_raise(UserError("first\n  second\n")), capsys) == "prog: error: first; second"


def test_bug_keeps_its_traceback():
    # A ValueError that no library raised for bad input is a bug: never caught wholesale.
    with pytest.raises(ValueError, match="internal"):
        run_entry("prog", _raise(ValueError("internal")))
    with pytest.raises(KeyError):
        run_entry("prog", _raise(KeyError("x")))


def test_medtune_traceback_reraises_user_errors(monkeypatch):
    monkeypatch.setenv("MEDTUNE_TRACEBACK", "1")
    with pytest.raises(UserError):
        run_entry("prog", _raise(UserError("bad")))


def test_status_passes_through():
    assert run_entry("prog", lambda: None) == 0
    assert run_entry("prog", lambda: 3) == 3
    with pytest.raises(SystemExit) as e:
        run_entry("prog", lambda: sys.exit(4))
    assert e.value.code == 4


def test_keyboard_interrupt_is_130_and_one_line(capsys):
    assert _fails(_raise(KeyboardInterrupt()), capsys, status=130) == "prog: interrupted"


def test_broken_stdout_pipe_exits_quietly():
    code = textwrap.dedent(
        """
        import sys
        from medtune.utils.errors import run_entry
        def main():
            for i in range(200000):
                print("row", i)
        sys.exit(run_entry("prog", main))
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout.readline() == b"row 0\n"
    proc.stdout.close()  # like `| head -1`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert err == ""


# ----------------------------------------------------------------------------- config


def test_yaml_parse_error_names_file_and_line(tmp_path, monkeypatch, capsys):
    main = _recipe(tmp_path, monkeypatch, "a: 1\nb: [1, 2\n")
    line = _fails(main, capsys)
    assert line.startswith(
        f"prog: error: {tmp_path / 'cfg.yaml'}: line 3 column 1: YAML does not parse"
    )


def test_missing_config_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["r.py", "--config", str(tmp_path / "nope.yaml")])
    main = config.parse(lambda cfg: 0)
    assert (
        _fails(main, capsys) == f"prog: error: {tmp_path / 'nope.yaml'}: No such file or directory"
    )


def test_malformed_override_and_removal_of_unknown_key(tmp_path, monkeypatch, capsys):
    main = _recipe(tmp_path, monkeypatch, "a: 1\n", "a")
    assert "overrides must be in the form of key=value, got a" in _fails(main, capsys)
    main = _recipe(tmp_path, monkeypatch, "a: 1\n", "~zz")
    assert "Could not find key zz" in _fails(main, capsys)


def test_omegaconf_missing_key_and_interpolation(tmp_path, monkeypatch, capsys):
    main = _recipe(tmp_path, monkeypatch, "a: 1\n", body=lambda cfg: cfg.epochs)
    assert (
        _fails(main, capsys) == "prog: error: epochs: missing from the config (Missing key epochs)"
    )
    main = _recipe(tmp_path, monkeypatch, "a: ${nope}\n", body=lambda cfg: cfg.a)
    assert _fails(main, capsys) == "prog: error: a: Interpolation key 'nope' not found"
    main = _recipe(tmp_path, monkeypatch, "a: ???\n", body=lambda cfg: cfg.a)
    assert _fails(main, capsys) == "prog: error: a: Missing mandatory value: a"


def test_component_that_does_not_import(tmp_path, monkeypatch, capsys):
    yaml_text = "optimizer:\n  _component_: torch.optim.AdamX\n  lr: 0.1\n"
    main = _recipe(
        tmp_path, monkeypatch, yaml_text, body=lambda cfg: config.instantiate(cfg.optimizer, [])
    )
    line = _fails(main, capsys)
    assert line.startswith("prog: error: optimizer._component_: cannot import 'torch.optim.AdamX'")
    assert "did you mean 'torch.optim.Adam'" in line
    main = _recipe(
        tmp_path,
        monkeypatch,
        "model:\n  _component_: nopkg.build\n",
        body=lambda cfg: config.instantiate(cfg.model),
    )
    assert "model._component_: cannot import 'nopkg.build' (No module named 'nopkg')" in _fails(
        main, capsys
    )


def test_component_given_an_argument_it_does_not_take(tmp_path, monkeypatch, capsys):
    yaml_text = "optimizer:\n  _component_: torch.optim.SGD\n  lrr: 0.1\n"
    params = [torch.nn.Parameter(torch.zeros(1))]
    main = _recipe(
        tmp_path, monkeypatch, yaml_text, body=lambda cfg: config.instantiate(cfg.optimizer, params)
    )
    assert _fails(main, capsys) == (
        "prog: error: optimizer: SGD.__init__() got an unexpected keyword argument 'lrr'"
    )


def test_type_error_inside_a_component_is_a_bug(tmp_path, monkeypatch):
    # The TypeError is raised inside the component's code, not when binding its arguments.
    yaml_text = "x:\n  _component_: textwrap.dedent\n  text: 5\n"
    main = _recipe(tmp_path, monkeypatch, yaml_text, body=lambda cfg: config.instantiate(cfg.x))
    with pytest.raises(TypeError):
        run_entry("prog", main)


# ----------------------------------------------------------------------------- files


def test_truncated_and_foreign_safetensors(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    good = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(4, 4)}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:40])
    line = _fails(lambda: load_file(str(cut)), capsys)
    assert line.startswith(f"prog: error: {cut}: not a readable safetensors file")
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_text("not tensors at all")
    assert f"{foreign}: not a readable safetensors file" in _fails(
        lambda: load_file(str(foreign)), capsys
    )


def test_pickle_where_a_checkpoint_should_be(tmp_path, capsys):
    import pickle

    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"w": subprocess.Popen}))  # a pickled global, not tensors
    line = _fails(lambda: torch.load(path, weights_only=True), capsys)
    assert line.startswith(f"prog: error: {path}: not a tensors-only checkpoint")
    zipped = tmp_path / "cut.pt"
    torch.save({"w": torch.ones(3)}, zipped)
    zipped.write_bytes(zipped.read_bytes()[:100])
    line = _fails(lambda: torch.load(zipped, weights_only=True), capsys)
    assert f"{zipped}: corrupt or truncated torch checkpoint" in line


def test_checkpoint_of_another_width(capsys):
    sd = torch.nn.Linear(2, 3).state_dict()
    line = _fails(lambda: torch.nn.Linear(2, 4).load_state_dict(sd), capsys)
    assert line.startswith("prog: error: checkpoint does not fit the model: ")
    assert "size mismatch for weight" in line and "(and 1 more)" in line


def _read(path):
    with open(path) as f:
        return f.read()


def test_missing_file_and_directory(tmp_path, capsys):
    assert _fails(lambda: _read(tmp_path / "x.json"), capsys) == (
        f"prog: error: {tmp_path / 'x.json'}: No such file or directory"
    )
    assert _fails(lambda: _read(tmp_path), capsys) == f"prog: error: {tmp_path}: Is a directory"


# ----------------------------------------------------------------------------- DataLoader workers


class _Rows(torch.utils.data.Dataset):
    def __init__(self, exc):
        self.exc = exc

    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i == 2:
            raise self.exc
        return torch.tensor(i)


def _iterate(exc):
    return lambda: list(torch.utils.data.DataLoader(_Rows(exc), num_workers=1))


def test_user_error_in_a_dataloader_worker_is_unwrapped(capsys):
    exc = DataError("missing field 'answer'", file="train.json", row=2, row_id=7)
    line = _fails(_iterate(exc), capsys)
    assert line == "prog: error: train.json row 2 (id 7): missing field 'answer'"


def test_missing_file_in_a_dataloader_worker_is_unwrapped(tmp_path, capsys):
    exc = FileNotFoundError(2, "No such file or directory", str(tmp_path / "img.png"))
    line = _fails(_iterate(exc), capsys)
    assert line == f"prog: error: [Errno 2] No such file or directory: '{tmp_path / 'img.png'}'"


def test_bug_in_a_dataloader_worker_keeps_the_worker_traceback():
    with pytest.raises(ZeroDivisionError, match="in DataLoader worker process 0"):
        run_entry("prog", _iterate(ZeroDivisionError("division by zero")))


def test_passthrough_leaves_an_inner_programs_errors_alone():
    from medtune.utils.errors import passthrough

    def inner():
        with passthrough():
            raise FileNotFoundError(2, "No such file or directory", "x.json")

    with pytest.raises(FileNotFoundError):
        run_entry("outer", inner)
