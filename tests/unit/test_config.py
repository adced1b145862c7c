"""TrainConfig refuses wrongly typed or out-of-range options when it is read, not deep inside training."""

from pathlib import Path

import pytest
import yaml

from dermsight.cli import main
from dermsight.training import TrainConfig

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))

BAD = [
    ("epochs", "3"),
    ("lr", [1]),
    ("calibrate", "no"),  # a non-empty string is truthy: calibration would run
    ("amp", 1),
    ("data", None),
    ("notes", 5),
    ("member_overrides", {"seed": 1}),
    ("cache_dir", 3),
    ("batch_size", 8.5),
    ("epochs", True),
    ("lr", float("nan")),
    ("taxonomy", "foo"),
    ("device", "gpu"),
    ("device", "cuda:1"),
    ("input_size", 0),
    ("cache_size", 0),
    ("threads", -1),
    ("num_workers", -1),
    ("label_smoothing", 2),
    ("label_smoothing", 1.0),
    ("scale_min", 5),
    ("scale_min", 0),
    ("patience", -1),
    ("weight_decay", -1),
    ("warmup_epochs", -3),
    ("max_steps_per_epoch", -1),
    ("hue", 0.6),
    ("jpeg", 1.5),
    ("jpeg_quality_min", 0),
    ("jpeg_quality_min", 99),
    ("hue", -0.1),
    ("drop_rate", 1.0),
    ("drop_rate", -0.1),
    ("crop_pct", 0),
    ("crop_pct", 1.5),
    ("val", 1.0),
    ("test", -0.1),
    ("out", ""),  # `--set out=` would write the run into the current folder
    ("data", " "),
]


@pytest.mark.parametrize("option, value", BAD, ids=[f"{k}={v!r}" for k, v in BAD])
def test_bad_values_are_refused_naming_the_option(option, value):
    with pytest.raises(ValueError, match=option) as e:
        TrainConfig(**{option: value})
    assert "\n" not in str(e.value)


def test_val_and_test_must_leave_training_data():
    TrainConfig(val=0.0, test=0.0)
    with pytest.raises(ValueError, match="val and test"):
        TrainConfig(val=0.5, test=0.5)


def test_numbers_of_either_kind_are_taken_where_a_float_is_declared():
    cfg = TrainConfig(lr=1, warmup_epochs=0, time_limit_s=60, cache_dir=None, device="cpu", taxonomy="isic2019")
    assert cfg.lr == 1 and cfg.time_limit_s == 60


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_bundled_config_loads(path):
    assert TrainConfig.from_yaml(path).epochs >= 1


def test_a_bad_member_override_is_refused_naming_the_member():
    with pytest.raises(ValueError, match=r"member_overrides\[1\]: epochs: Input should be a valid integer, got 'x'"):
        TrainConfig(member_overrides=[{"seed": 1}, {"epochs": "x"}])
    with pytest.raises(ValueError, match=r"member_overrides\[0\]: label_smoothing"):
        TrainConfig(member_overrides=[{"label_smoothing": 2}, {"seed": 1}])


def test_the_cli_reports_a_bad_value_as_a_usage_error(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": str(tmp_path), "input_size": 0}))
    assert main(["train", "--config", str(config), "--prepare-only"]) == 2
    assert capsys.readouterr().err.strip() == "error: input_size: Input should be greater than or equal to 32, got 0"


def test_data_is_one_path_or_a_list_of_them():
    assert TrainConfig(data="/d/a").data_paths == ["/d/a"]
    assert TrainConfig(data=["/d/a", "/d/b"]).data_paths == ["/d/a", "/d/b"]
    assert TrainConfig.parse_override("data=[/d/a, /d/b]") == ("data", ["/d/a", "/d/b"])
    assert TrainConfig.parse_override("data=/d/[odd] name") == ("data", "/d/[odd] name")  # text as written
    for bad in ([], ["/d/a", " "]):
        with pytest.raises(ValueError, match="data"):
            TrainConfig(data=bad)


def test_display_aspect_names_data_folders_and_takes_ratios(tmp_path):
    cfg = TrainConfig(data=["/d/ham", "/d/isic2017_256"], display_aspect={"isic2017_256": "4:3"})
    assert cfg.display_aspect == {"isic2017_256": pytest.approx(4 / 3)}
    assert TrainConfig(data="/d/x", display_aspect={"x": 1.5}).display_aspect == {"x": 1.5}
    key, value = TrainConfig.parse_override('display_aspect={x: "4:3"}')  # --set takes the same text
    assert (key, value) == ("display_aspect", {"x": pytest.approx(4 / 3)})
    with pytest.raises(ValueError, match="not the folder name"):
        TrainConfig(data="/d/x", display_aspect={"isic2017": "4:3"})
    with pytest.raises(ValueError, match="quoted"):  # YAML 1.1 reads an unquoted 4:3 as 243
        (tmp_path / "c.yaml").write_text("data: /d/x\ndisplay_aspect: {x: 4:3}\n")
        TrainConfig.from_yaml(tmp_path / "c.yaml")
    for bad in ("4:0", "-1", "wide", True):
        with pytest.raises(ValueError, match="display_aspect"):
            TrainConfig(data="/d/x", display_aspect={"x": bad})


def test_jpeg_needs_the_loader_path():
    assert TrainConfig(jpeg=0.5).jpeg == 0.5
    with pytest.raises(ValueError, match="augment: loader"):
        TrainConfig(jpeg=0.5, augment="device")


def test_an_option_given_twice_in_a_config_file_is_refused(tmp_path):
    # YAML keeps the last of two equal keys without a word: the run would not be the one the file seems to describe.
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nlr: 0.001\nepochs: 5\n")
    with pytest.raises(ValueError, match="option 'epochs' is given twice"):
        TrainConfig.from_yaml(path)
    path.write_text("epochs: 3\nmember_overrides:\n  - {seed: 1}\n  - {seed: 2}\n")
    assert TrainConfig.from_yaml(path).epochs == 3  # the same key in separate mappings is fine
