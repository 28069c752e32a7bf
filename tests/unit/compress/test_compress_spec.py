"""The spec strings of the command line."""

import pytest

from downpour.compress import COMPRESSORS, parse


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("none", "none"),
        ("fp16", "fp16"),
        ("topk:0.01", "error_feedback(topk:ratio=0.01)"),
        ("topk:ratio=0.01,fp16", "error_feedback(topk:ratio=0.01,fp16)"),
        (" topk : ratio = 0.01 , fp16 ", "error_feedback(topk:ratio=0.01,fp16)"),
        ("threshold:tau=2", "threshold:tau=2.0"),
        ("threshold:2,entropy", "threshold:tau=2.0,entropy:level=6"),
        ("threshold:tau=2,entropy:level=9", "threshold:tau=2.0,entropy:level=9"),
        ("onebit", "error_feedback(onebit:chunk=512)"),
        ("onebit:chunk=1024", "error_feedback(onebit:chunk=1024)"),
        ("topk:0.001,fp16,entropy", "error_feedback(topk:ratio=0.001,fp16,entropy:level=6)"),
    ],
)
def test_specs(spec, name):
    assert parse(spec).name == name


def test_feedback_can_be_turned_off():
    assert parse("topk:0.01", feedback=False).name == "topk:ratio=0.01"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("topkk", "unknown compressor 'topkk'; choose one of: " + ", ".join(sorted(COMPRESSORS))),
        ("topk:rate=0.1", "unknown topk option 'rate'; choose one of: ratio"),
        ("topk:abc", "topk ratio must be a number, got 'abc'"),
        ("onebit:chunk=1.5", "onebit chunk must be an integer, got '1.5'"),
        ("topk:0", r"topk ratio must be in \(0, 1\], got 0.0"),
        ("topk:nan", "topk ratio must be a finite number"),
        ("threshold:tau=-2", "threshold tau must be positive"),
        ("fp16:3", "fp16 takes no options, got '3'"),
        ("topk:ratio=0.1;ratio=0.2", "option 'ratio' is given twice"),
        ("topk:ratio", "topk ratio must be a number, got 'ratio'"),
        ("topk:ratio=", "option 'ratio=' is not key=value"),
        ("topk:0.1,", "empty compressor stage"),
        ("", "empty compressor stage"),
        ("entropy", "cannot start with entropy:level=6: it takes Sparse, Signs payloads"),
        ("threshold:2,fp16", r"stage 2 \(fp16\) cannot take what the stages before make \(Signs\)"),
        ("onebit,entropy", r"stage 2 \(entropy:level=6\) cannot take .*\(OneBit\)"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        parse(spec)
