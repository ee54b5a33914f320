"""eval_fid.py --runs on folders made by train.py: the test split is generated with each run's best adapter,
scored against that run's own held-out images, and tabulated by method."""
import json

import eval_fid
import train
import weights
from fid_reference import inception_file, inception_state  # noqa: F401  (pytest fixtures)


def test_runs_of_train_py_are_generated_and_scored(inception_file, tmp_path):
    runs = []
    for method in ("lora", "selora"):
        out = tmp_path / method
        assert train.main(["--out", str(out), "--method", method, "--epochs", "1", "--samples", "0",
                           "--split", "70,10,20"]) == 0
        runs.append(out)
    result = eval_fid.main(["--runs", *map(str, runs), "--inception", str(inception_file), "--dims", "64",
                            "--kid-subsets", "5", "--table", str(tmp_path / "table")])
    for out, report in zip(runs, result["runs"]):
        test_names = json.loads((out / "split.json").read_text())["splits"]["test"]
        generated = eval_fid.list_images(out / "samples")
        assert len(generated) == len(test_names) == len(eval_fid.list_images(out / "real")) > 0
        prompts = eval_fid.read_prompts(out / "samples" / "prompts.txt")
        captions = {json.loads(line)["file_name"]: json.loads(line)["text"]
                    for line in (out / "phantoms" / "metadata.jsonl").read_text().splitlines()}
        assert prompts == [captions[n] for n in test_names]
        assert report["real"] == str(out / "real") and report["fid"]["64"] > 0
        # the images were made with this run's own adapter file
        assert weights.load_metadata(out / "best.safetensors")["method"] == out.name
    rows = result["table"]
    assert sorted(r["method"] for r in rows) == ["lora", "selora"]
    markdown = (tmp_path / "table.md").read_text()
    assert "| lora |" in markdown and "| selora |" in markdown
