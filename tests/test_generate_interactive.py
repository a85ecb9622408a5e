"""`wanlora-generate --interactive`: models load once, each typed line renders, a bad line (an
unparsable option, an unreadable image, a size or frame count the task rejects) is reported and
the session goes on, EOF ends it."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_interactive_session(tiny_dir, tmp_path):
    flags = json.loads((tiny_dir("t2v-1.3B") / "manifest.json").read_text())["flags"]
    argv = [sys.executable, "-m", "wanlora.commands.generate", "--interactive", "--save_path", str(tmp_path),
            "--video_size", "32", "32", "--video_length", "5", "--infer_steps", "2", "--seed", "3"]
    for k, v in flags.items():
        argv += [k, v]
    typed = ("a red ball rolls --d 11\n"
             "# a comment line is skipped\n"
             "a bad line --frames 9\n"
             f"a missing image --i {tmp_path / 'no_such_image.png'}\n"
             "a frame count that is not 4n+1 --f 6\n"
             "a size below the pixel unit --w 8 --h 8\n"
             "a blue square --f 1 --d 12\n")
    r = subprocess.run(argv, input=typed, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Enter a prompt" in r.stdout
    # every bad line is reported on one line and the session goes on to the next one
    assert "--frames" in r.stdout + r.stderr
    assert "no_such_image.png" in r.stderr and "file not found" in r.stderr
    assert "--video_length 6 is not 4n+1" in r.stderr
    assert "smaller than the task's unit" in r.stderr
    assert "Traceback" not in r.stderr
    videos = sorted(tmp_path.glob("*.mp4"))
    stills = sorted(tmp_path.glob("*.png"))
    assert len(videos) == 1 and "11" in videos[0].name
    assert len(stills) == 1 and "12" in stills[0].name
    sidecars = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
    assert sorted(s["prompt"] for s in sidecars) == ["a blue square", "a red ball rolls"]
