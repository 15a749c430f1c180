"""`make demo` end to end at a toy size: data, convert, sampled training, extract + verify."""

import torch

from hfs.demo import DemoSizes, print_summary, run_demo


def test_demo_pipeline_runs_end_to_end(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sizes = DemoSizes(identities=16, images_per_identity=5, verify_identities=6, verify_pairs=40, image_size=16,
                      steps=6, batch_size=16, sample_num=12)
    try:
        summary = run_demo(tmp_path / "demo", sizes)
    finally:
        torch.set_num_threads(threads)
    r = summary["result"]
    assert r.mode == "sampled" and r.steps == 6 and r.active_classes == 12 and not r.interrupted
    assert 0.0 <= summary["verification"] <= 1.0 and r.val_top1 is not None
    assert (tmp_path / "demo" / "verify_features.npy").is_file()
    print_summary(summary)
    assert "HF-softmax" in capsys.readouterr().out
    assert summary["negatives"] == "exact negatives under the similarity ceiling"  # what it ran, not a fixed text


def test_the_summary_names_the_sampler_the_run_used():
    from hfs.config import config_from_dict
    from hfs.demo import negatives_in_words

    assert negatives_in_words(config_from_dict({"sampler": {"type": "annoy", "ceiling": "off"}}).sampler) == \
        "annoy negatives"
