"""DCASE file names (2020-2025) and attributes csv files."""

import pytest

from asd.data import dcase


@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "section_00_source_train_normal_0001_vel_8_loc_B.wav",
            dict(section="00", domain="source", split="train", label="normal", clip_index=1,
                 attributes={"vel": "8", "loc": "B"}, name_format="dcase2021"),
        ),
        (
            "section_00_target_test_anomaly_0012_noAttribute.wav",
            dict(section="00", domain="target", split="test", label="anomaly", clip_index=12,
                 attributes={}, attribute_string="noAttribute"),
        ),
        (
            "section_02_source_test_normal_0000.wav",  # 2021/2024 test names without attributes
            dict(section="02", domain="source", split="test", label="normal", attributes={}, attribute_string=None),
        ),
        (
            "section_00_source_train_normal_0000_car_C2_spd_34V_mic_1.wav",
            dict(attributes={"car": "C2", "spd": "34V", "mic": "1"}),
        ),
        ("section_00_source_train_normal_0000_m-n_X.wav", dict(attributes={"m-n": "X"})),
        (
            "section_00_source_train_normal_0003_weight00_BckgA_x.wav",  # odd token count: positional
            dict(attributes={"p1": "weight00", "p2": "BckgA", "p3": "x"}),
        ),
        (
            "section_00_0042.wav",
            dict(section="00", domain=None, split=None, label=None, clip_index=42, name_format="eval"),
        ),
        (
            "normal_id_00_00000000.wav",
            dict(section="00", domain=None, label="normal", clip_index=0, name_format="dcase2020"),
        ),
        (
            "anomaly_id_02_00000007.wav",
            dict(section="02", label="anomaly", clip_index=7, name_format="dcase2020"),
        ),
        ("id_05_00000012.wav", dict(section="05", label=None, clip_index=12, name_format="dcase2020_eval")),
    ],
)
def test_parse_name_forms(name, expected):
    parsed = dcase.parse_name(name)
    for key, value in expected.items():
        assert getattr(parsed, key) == value, key


@pytest.mark.parametrize(
    "bad", ["recording_0001.wav", "section_0_source_train_normal_0001.wav", "section_00_left_train_normal_0001.wav", ""]
)
def test_unknown_names_raise(bad):
    with pytest.raises(dcase.NameError_, match="matches no DCASE"):
        dcase.parse_name(bad)


def test_format_name_round_trips():
    name = dcase.format_name("01", "target", "test", "anomaly", 7, {"speed": "1500", "load": "30"})
    assert name == "section_01_target_test_anomaly_0007_speed_1500_load_30.wav"
    parsed = dcase.parse_name(name)
    assert parsed.attributes == {"speed": "1500", "load": "30"} and parsed.clip_index == 7
    assert dcase.format_name("00", "source", "train", "normal", 3).endswith("_0003_noAttribute.wav")


def test_attributes_csv():
    text = (
        "file_name,d1p,d1v,d2p,d2v\n"
        "bearing/train/section_00_source_train_normal_0000_vel_8_loc_B.wav,vel,8,loc,B\n"
        "bearing/test/section_00_0001.wav,vel,12,loc,A\n"
        "fan/train/x.wav,m-n,X,,\n"
    )
    table = dcase.parse_attributes_csv(text)
    assert table["section_00_source_train_normal_0000_vel_8_loc_B.wav"] == {"vel": "8", "loc": "B"}
    assert table["section_00_0001.wav"] == {"vel": "12", "loc": "A"}
    assert table["x.wav"] == {"m-n": "X"}
    assert dcase.attributes_csv_section("fan/attributes_03.csv") == "03"
    assert dcase.attributes_csv_section("fan/attrs.csv") is None
    with pytest.raises(ValueError, match="file_name"):
        dcase.parse_attributes_csv("name,a\nx.wav,1\n")
