"""Every numeric setting is finite and within a sane range when it is parsed: NaN, infinities, 1e9 learning
rates and seeds beyond 32 bits stop the job with one line naming the flag, exit 2, before Ray is imported."""

import subprocess
import sys

import pytest

from jobs.pipeline import PipelineConfig
from jobs.search import SearchConfig
from jobs.serve import ServeConfig
from lib.config import parse_config
from lib.errors import UserError
from lib.evaluation import EvaluateConfig
from lib.prepare import PrepareConfig
from lib.training import TrainConfig
from tuning.run import TuneJobConfig
from tuning.spaces import check_space

REQUIRED = {TrainConfig: ["--data-dir", "d", "--run-dir", "r"], TuneJobConfig: ["--data-dir", "d", "--run-dir", "r"],
            EvaluateConfig: ["--data-dir", "d", "--run-dir", "r"], PipelineConfig: ["--source", "cifar10", "--run-dir", "r"],
            PrepareConfig: ["--source", "cifar10", "--data-dir", "d"], ServeConfig: ["--run-dir", "r"],
            SearchConfig: ["--run-dir", "r", "--test-ids", "t"]}

REFUSED = [
    (TrainConfig, "--lr", "nan", "--lr: expected a finite number, got nan"),
    (TrainConfig, "--lr", "inf", "--lr: expected a finite number, got inf"),
    (TrainConfig, "--lr", "1e400", "--lr: expected a finite number, got inf"),
    (TrainConfig, "--lr", "1e9", "--lr must be at most 10, got 1000000000.0"),
    (TrainConfig, "--margin", "inf", "--margin: expected a finite number"),
    (TrainConfig, "--margin=-inf", None, "--margin: expected a finite number"),
    (TrainConfig, "--weight-decay", "inf", "--weight-decay: expected a finite number"),
    (TrainConfig, "--warmup-epochs", "nan", "--warmup-epochs: expected a finite number"),
    (TrainConfig, "--seed", str(2**70), f"--seed: {2**70} does not fit in 64 bits"),
    (TrainConfig, "--seed", str(2**32), f"--seed must be at most {2**32 - 1}, got {2**32}"),
    (TrainConfig, "--epochs", "1000000", "--epochs must be at most 10000"),
    (TrainConfig, "--batch-size", "10000000", "--batch-size must be at most 65536"),
    (TrainConfig, "--image-size", "100000", "--image-size must be at most 1024"),
    (TrainConfig, "--embedding-dim", "1000000", "--embedding-dim must be at most 8192"),
    (TrainConfig, "--num-workers", "100000", "--num-workers must be at most 1024"),
    (TuneJobConfig, "--seed", str(2**40), "--seed must be at most 4294967295"),
    (TuneJobConfig, "--num-samples", "1000000000", "--num-samples must be at most 10000"),
    (TuneJobConfig, "--reduction-factor", "nan", "--reduction-factor: expected a finite number"),
    (TuneJobConfig, "--reduction-factor", "1e12", "--reduction-factor must be at most 1000"),
    (EvaluateConfig, "--batch-size", "100000000", "--batch-size must be at most 65536"),
    (EvaluateConfig, "--seed", str(2**33), "--seed must be at most 4294967295"),
    (PipelineConfig, "--lr", "nan", "--lr: expected a finite number"),
    (PipelineConfig, "--margin", "1e9", "--margin must be at most 4"),
    (PipelineConfig, "--seed", str(2**63), f"--seed: {2**63} does not fit in 64 bits"),
    (PrepareConfig, "--val-fraction", "nan", "--val-fraction: expected a finite number"),
    (PrepareConfig, "--seed", str(2**32), "--seed must be at most 4294967295"),
    (ServeConfig, "--batch-wait-ms", "inf", "--batch-wait-ms: expected a finite number"),
    (ServeConfig, "--max-upload-mb", "1e9", "--max-upload-mb must be at most 1024"),
    (SearchConfig, "--k", "1000000000000", "--k must be at most 10000"),
]


@pytest.mark.parametrize(("config", "flag", "value", "message"), REFUSED,
                         ids=[f"{c.__name__}{flag}={value}" for c, flag, value, _ in REFUSED])
def test_a_non_finite_or_huge_setting_is_one_line_naming_the_flag(config, flag, value, message):
    with pytest.raises(UserError) as err:
        parse_config(config, [*REQUIRED[config], flag, *([] if value is None else [value])])
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_the_bounds_themselves_are_accepted():
    cfg = parse_config(TrainConfig, [*REQUIRED[TrainConfig], "--seed", str(2**32 - 1), "--lr", "10", "--margin", "4",
                                     "--weight-decay", "0", "--epochs", "10000", "--batch-size", "65536"])
    assert (cfg.seed, cfg.lr, cfg.margin, cfg.epochs) == (2**32 - 1, 10.0, 4.0, 10_000)


def test_a_config_file_and_a_search_space_are_held_to_the_same_rules(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: .nan\n")
    with pytest.raises(UserError, match=r"key 'lr' in config file .*c.yaml: expected a finite number"):
        parse_config(TrainConfig, [*REQUIRED[TrainConfig], "--config", str(tmp_path / "c.yaml")])
    with pytest.raises(UserError, match=r"key 'lr' in search space test: values must be at most 10"):
        check_space({"lr": {"loguniform": [1e-3, 1e9]}}, "test")
    with pytest.raises(UserError, match=r"key 'margin' in search space test: expected a finite number"):
        check_space({"margin": {"uniform": [0.1, float("inf")]}}, "test")


def test_jobs_train_refuses_nan_with_one_line_and_exit_2_before_ray_starts():
    probe = ("import sys; from jobs import train; code = train.cli(sys.argv[1:]); "
             "assert 'ray' not in sys.modules or not sys.modules['ray'].is_initialized(), 'ray started'; "
             "sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe, "--data-dir", "d", "--run-dir", "r", "--lr", "nan"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == ["jobs.train: error: --lr: expected a finite number, got nan"]
