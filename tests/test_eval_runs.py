"""eval_fid.py --runs on folders made by train.py: the test split is generated with each run's best adapter,
scored against that run's own held-out images, and tabulated by method; made again by another sampler when
one is asked for."""
import json

from model import weights
import eval_fid
import train
from fid_reference import inception_file, inception_state  # noqa: F401  (pytest fixtures)


def test_runs_of_train_py_are_generated_and_scored(inception_file, tmp_path):
    runs = []
    for method in ("lora", "selora"):
        out = tmp_path / method
        assert train.main(["--out", str(out), "--method", method, "--epochs", "1", "--samples", "0",
                           "--split", "70,10,20"]) == 0
        runs.append(out)
    common = ["--runs", *map(str, runs), "--inception", str(inception_file), "--dims", "64", "--kid-subsets", "5",
              "--table", str(tmp_path / "table")]
    result = eval_fid.main(common)
    for out, report in zip(runs, result["runs"]):
        test_names = json.loads((out / "split.json").read_text())["splits"]["test"]
        generated = eval_fid.list_images(out / "samples")
        assert len(generated) == len(test_names) == len(eval_fid.list_images(out / "real")) > 0
        prompts = eval_fid.read_prompts(out / "samples" / "prompts.txt")
        captions = {json.loads(line)["file_name"]: json.loads(line)["text"]
                    for line in (out / "phantoms" / "metadata.jsonl").read_text().splitlines()}
        assert prompts == [captions[n] for n in test_names]
        assert report["real"] == str(out / "real") and report["fid"]["64"] > 0
        assert report["sampling"] == {"scheduler": "pndm", "steps": 50, "guidance": 7.5, "eta": 0.0, "seed": 0,
                                      "size": 32}
        # the images were made with this run's own adapter file
        assert weights.load_metadata(out / "best.safetensors")["method"] == out.name
    rows = result["table"]
    assert sorted(r["method"] for r in rows) == ["lora", "selora"]
    markdown = (tmp_path / "table.md").read_text()
    assert "| lora |" in markdown and "| selora |" in markdown
    assert "Test images made by pndm, 50 steps, guidance 7.5." in markdown
    # another sampler: each run's test images are made again by it, and the reports say so
    before = [(out / "samples" / "00000.png").read_bytes() for out in runs]
    again = eval_fid.main(common + ["--scheduler", "dpmpp2m", "--sample-steps", "5"])
    for out, report, image in zip(runs, again["runs"], before):
        assert report["sampling"]["scheduler"] == "dpmpp2m" and report["sampling"]["steps"] == 5
        assert (out / "samples" / "00000.png").read_bytes() != image
    assert "Test images made by dpmpp2m, 5 steps, guidance 7.5." in (tmp_path / "table.md").read_text()
