"""The `kvray` command in-process: `methods -v` after the subcommand, and `eval --dataset`
evaluating the whole dataset unless told otherwise."""

import pandas as pd

from kvray.cli import main
from kvray.presses import list_methods


def test_methods_verbose_after_the_subcommand(capsys):
    assert main(["methods", "-v"]) == 0
    out = capsys.readouterr().out
    assert out.count("params:") == len(list_methods()) and "window_size" in out
    assert main(["methods"]) == 0
    assert "params:" not in capsys.readouterr().out


def test_eval_dataset_is_evaluated_whole_by_default(tiny_dir, tmp_path, capsys):
    rows = [dict(context=f"Item {i} is stored in box {i * 3}. " * 8, question=f"Where is item {i}?",
                 answer_prefix="Answer:", answer=[f"box {i * 3}"], max_new_tokens=2) for i in range(7)]
    path = tmp_path / "boxes.parquet"
    pd.DataFrame(rows).to_parquet(path)
    out = tmp_path / "results"
    common = ["eval", "--model", tiny_dir, "--dataset", str(path), "--methods", "knorm", "--ratios", "0.5",
              "--out", str(out), "--no-progress"]
    assert main(common) == 0
    assert "7 samples x 1 configs" in capsys.readouterr().err
    assert main(common + ["--samples", "3"]) == 0
    assert "3 samples x 1 configs" in capsys.readouterr().err
