"""The quickstart's parts that need no training: the config shipped inside the package, the sample data,
rank capping and the command line."""

import os

from dsee_dist.config import load_config
from dsee_dist.recipes import quickstart
from tests.bench.conftest import save_tiny_model


def test_shipped_config_loads_from_any_directory_with_the_package_sample(tmp_path, monkeypatch):
    model = save_tiny_model("llama", tmp_path / "model")
    monkeypatch.chdir(tmp_path)  # not a clone: everything comes from the package
    sample = quickstart.package_file("data", "e2e_sample")
    config = quickstart.package_file("recipes", "configs", quickstart.CONFIG)
    cfg = load_config(
        str(config),
        [
            f"model.path={model}",
            f"data.train_path={sample / 'train.csv'}",
            f"data.eval_path={sample / 'test.csv'}",
            f"output.dir={tmp_path / 'run'}",
        ],
    )
    assert cfg.method == "dsee" and cfg.dsee.num_sparse == 384 and cfg.dsee.support == "magnitude"
    assert cfg.train.epochs == 1 and cfg.train.micro_batch_size * 2 == 16  # 2 ranks: 25 steps of the 400 pairs
    assert os.path.isfile(cfg.deepspeed.config) or (config.parent / cfg.deepspeed.config).is_file()
    assert len((sample / "train.csv").read_text().splitlines()) == 401


def test_ranks_are_capped_at_the_local_gpus(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert quickstart.local_ranks(2) == 1
    assert "2 ranks asked for but this machine has 1 GPU(s): using 1" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert quickstart.local_ranks(2) == 2


def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "qs"
    assert quickstart.main(["--ranks", "0", "--output-dir", str(out)]) == 2
    assert "--ranks must be at least 1" in capsys.readouterr().err
    assert quickstart.main(["--model", str(tmp_path / "missing"), "--output-dir", str(out)]) == 2
    assert "is not a Hugging Face model directory" in capsys.readouterr().err
    assert not out.exists()
