"""The PPCA convergence benchmark resumes an interrupted run: rows it wrote are kept, only the
others are trained, and results written for other table settings are refused."""

import json

import pytest


@pytest.fixture
def benchmark(monkeypatch, ppca_benchmark):
    module = ppca_benchmark
    trained = []

    def run_row(table, data, latent_dim, guide, loss, folder):
        trained.append((table, guide, loss))
        return {"table": table, "guide": guide, "loss": loss, "gap": 0.0, "kl": 0.0,
                "steps": 1, "converged": True, "seconds": 0.0, "finished": "now"}

    monkeypatch.setattr(module, "run_row", run_row)
    monkeypatch.setattr(module, "write_table", lambda name, spec, folder: (folder / name, 1))
    return module, trained


def run(module, out, *extra):
    args = module.build_parser().parse_args(
        ["--tables", "issue-12", "small-30", "--losses", "elbo", "iwae", "--out", str(out),
         "--name", "t", *extra])
    return module.main(args)


def test_resume_runs_only_the_missing_rows_and_keeps_the_order(benchmark, tmp_path):
    module, trained = benchmark
    first = run(module, tmp_path)
    assert len(trained) == 8 and first["complete"]
    written = json.loads((tmp_path / "t.json").read_text())
    written["rows"] = [row for i, row in enumerate(written["rows"]) if i % 3]
    written["complete"] = False
    (tmp_path / "t.json").write_text(json.dumps(written))
    trained.clear()
    resumed = run(module, tmp_path, "--resume")
    missing = [(row["table"], row["guide"], row["loss"])
               for i, row in enumerate(first["rows"]) if i % 3 == 0]
    assert trained == missing
    assert [(r["table"], r["guide"], r["loss"]) for r in resumed["rows"]] == [
        (r["table"], r["guide"], r["loss"]) for r in first["rows"]]
    assert resumed["complete"] and len(resumed["sessions"]) == 2
    assert "resumed, in 2 sessions" in (tmp_path / "t.md").read_text()


def test_resume_refuses_results_of_other_table_settings(benchmark, tmp_path):
    module, _ = benchmark
    run(module, tmp_path)
    written = json.loads((tmp_path / "t.json").read_text())
    written["tables"]["small-30"]["sigma"] = 0.5
    (tmp_path / "t.json").write_text(json.dumps(written))
    with pytest.raises(SystemExit, match="other settings of"):
        run(module, tmp_path, "--resume")


def test_resume_without_earlier_results_says_how_to_start(benchmark, tmp_path):
    module, _ = benchmark
    with pytest.raises(SystemExit, match="run without --resume"):
        run(module, tmp_path, "--resume")
