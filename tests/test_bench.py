"""The benchmark refuses what it cannot measure, and never times a run that failed."""

import pytest

from pneumonia_batch import bench


def test_too_few_files_are_refused_before_any_work(monkeypatch, tmp_path, capsys):
    def no_corpus(*args, **kwargs):
        raise AssertionError("the corpus was built")

    monkeypatch.setattr(bench, "build_corpus", no_corpus)
    with pytest.raises(SystemExit) as refused:
        bench.main(["--data", str(tmp_path), "--files", str(bench.MIN_FILES - 1)])
    assert refused.value.code == 2
    assert f"--files must be at least {bench.MIN_FILES}" in capsys.readouterr().err


def test_the_smallest_corpus_that_gives_three_screening_batches_is_accepted(monkeypatch, tmp_path):
    assert bench.MIN_FILES == 2 * bench.SCREEN_BATCH + 1

    class Reached(Exception):
        pass

    def corpus(data, target, n_files):
        raise Reached(n_files)

    monkeypatch.setattr(bench, "build_corpus", corpus)
    with pytest.raises(Reached):
        bench.main(["--data", str(tmp_path), "--files", str(bench.MIN_FILES)])


def fake_seed_loop(monkeypatch, script):
    monkeypatch.setattr(bench, "SEED_LOOP", script)


def test_a_crashed_seed_loop_fails_the_benchmark(monkeypatch, tmp_path):
    fake_seed_loop(monkeypatch, "raise RuntimeError('no such model')")
    with pytest.raises(bench.BenchFailed, match="(?s)seed-style loop exited with code 1.*no such model"):
        bench.seed_loop(tmp_path, tmp_path / "model.keras", 3)


def test_a_seed_loop_that_scored_too_few_files_fails_the_benchmark(monkeypatch, tmp_path):
    fake_seed_loop(monkeypatch, "print(2)")
    with pytest.raises(bench.BenchFailed, match="scored 2 images of 3 files"):
        bench.seed_loop(tmp_path, tmp_path / "model.keras", 3)
    fake_seed_loop(monkeypatch, "pass")
    with pytest.raises(bench.BenchFailed, match="scored no images of 3 files"):
        bench.seed_loop(tmp_path, tmp_path / "model.keras", 3)


def test_the_seed_loop_gets_an_absolute_model_path(monkeypatch, tmp_path):
    fake_seed_loop(monkeypatch, "import sys, os; print(3 if os.path.isabs(sys.argv[2]) else 0)")
    monkeypatch.chdir(tmp_path)
    bench.seed_loop(tmp_path, bench.Path("weights") / "model.keras", 3)  # 3 printed: accepted
