#!/usr/bin/env python3
"""
Tests of dev/data/prepare.py (GPT-2 BPE, llm.c token shards, llm.c tokenizer file).
Plain python3 >= 3.9, standard library only:

    python3 tests/test_data.py [--shared ../shared/data]

Prints one line per check (PASS name / FAIL name: detail / SKIP name: why), then a summary
line "N passed, M failed"; exits 1 if any check failed.
"""

import argparse
import importlib.util
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import unicodedata

sys.dont_write_bytecode = True  # importing prepare.py must not leave __pycache__ in the repo
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPARE = os.path.join(REPO_ROOT, "dev", "data", "prepare.py")

RESULTS = {"passed": 0, "failed": 0, "skipped": 0}


def report(name, ok, detail=""):
    if ok:
        RESULTS["passed"] += 1
        print("PASS " + name + ("  (" + detail + ")" if detail else ""))
    else:
        RESULTS["failed"] += 1
        print("FAIL {}: {}".format(name, detail))
    sys.stdout.flush()


def skip(name, why):
    RESULTS["skipped"] += 1
    print("SKIP {}: {}".format(name, why))


def check(name, fn):
    """Runs fn(); it returns (ok, detail) or raises (a failure)."""
    try:
        ok, detail = fn()
    except Exception as e:
        ok, detail = False, "{}: {} [{}]".format(type(e).__name__, e,
                                                 traceback.extract_tb(e.__traceback__)[-1].lineno)
    report(name, ok, detail)
    return ok


# ---------------------------------------------------------------------------------------------
# readers written independently of prepare.py

def read_shard(path):
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 1024:
        raise ValueError("{}: {} bytes, shorter than the header".format(path, len(data)))
    header = struct.unpack("<256i", data[:1024])
    n = header[2]
    body = data[1024:]
    tokens = list(struct.unpack("<{}H".format(len(body) // 2), body[:len(body) // 2 * 2]))
    return header, tokens, len(data)


def read_tokenizer(path):
    with open(path, "rb") as f:
        data = f.read()
    header = struct.unpack("<256i", data[:1024])
    pieces = []
    pos = 1024
    for _ in range(header[2]):
        n = data[pos]
        pieces.append(data[pos + 1:pos + 1 + n])
        if len(pieces[-1]) != n:
            raise ValueError("tokenizer file truncated in token {}".format(len(pieces) - 1))
        pos += 1 + n
    return header, pieces, len(data) - pos


def decode(pieces, ids):
    return b"".join(pieces[i] for i in ids)


def run_prepare(args, env=None, timeout=300, script=PREPARE):
    t0 = time.time()
    p = subprocess.run([sys.executable, script] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       env=env, timeout=timeout)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace"), time.time() - t0


def offline_env():
    """An environment in which every download fails at once: all traffic goes to a closed local port."""
    env = dict(os.environ)
    for k in ("no_proxy", "NO_PROXY"):
        env.pop(k, None)
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env[k] = "http://127.0.0.1:9"
    return env


def one_line_error(rc, err, must_contain):
    lines = [l for l in err.splitlines() if l.strip()]
    if rc != 1:
        return False, "exit status {}, expected 1; stderr: {!r}".format(rc, err[-300:])
    if len(lines) != 1:
        return False, "expected one line on stderr, got {}: {!r}".format(len(lines), err[-300:])
    for s in must_contain:
        if s not in lines[0]:
            return False, "message lacks {!r}: {!r}".format(s, lines[0])
    return True, lines[0]


# ---------------------------------------------------------------------------------------------

KNOWN = [
    # text, ids from OpenAI's GPT-2 tokenizer
    ("Hello world", [15496, 995]),
    ("Hello, world!", [15496, 11, 995, 0]),
    (" the", [262]),
    ("\n", [198]),
    ("\n\n", [628]),
    (" to the world.", [284, 262, 995, 13]),
]

ROUND_TRIP_TEXT = ("H\u00e9llo w\u00f6rld! na\u00efve caf\u00e9 \u2014 \u65e5\u672c\u8a9e \u30c6\u30b9\u30c8 "
                   "\u0661\u0662\u0663 42 3.14159 \U0001F600\U0001F680 \U0001F469\u200d\U0001F469\u200d\U0001F467 "
                   "\t\ttabs  \n\n\n   spaces\u00a0nbsp\u2003em\u3000ideo\r\nCRLF\x1c\x1fctl \u00df\u1e9e "
                   "I'm you're we've he'll she'd it's 'S <|endoftext|> \ufeffbom \U00010348 end ")

# hand-derived splits of GPT-2's pattern
PRETOKENIZE = [
    ("I'm  here!!\n\n  42x", ["I", "'m", " ", " here", "!!", "\n\n ", " 42", "x"]),
    ("Hello, world!", ["Hello", ",", " world", "!"]),
    ("a\u00a0b \u65e5\u672c 12\u0663 \U0001F600!", ["a", "\u00a0", "b", " \u65e5\u672c", " 12\u0663", " \U0001F600!"]),
    ("x \x1cy", ["x", " \x1c", "y"]),
    ("end  ", ["end", "  "]),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.path.join(os.path.dirname(REPO_ROOT), "shared", "data"),
                    help="folder with tinyshakespeare.txt and gpt2/ (default ../shared/data from the repo root)")
    args = ap.parse_args()
    shared = os.path.abspath(args.shared)
    ts_path = os.path.join(shared, "tinyshakespeare.txt")
    bpe_dir = os.path.join(shared, "gpt2")
    print("python {}, prepare.py at {}, shared data at {}".format(sys.version.split()[0], PREPARE, shared))

    try:
        spec = importlib.util.spec_from_file_location("prepare", PREPARE)
        prep = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(prep)
    except Exception as e:
        report("import dev/data/prepare.py", False, "{}: {}".format(type(e).__name__, e))
        return finish()

    if not os.path.isfile(ts_path) or not os.path.isfile(os.path.join(bpe_dir, "encoder.json")):
        report("shared data present", False, "no {} or {}/encoder.json (pass --shared DIR)".format(ts_path, bpe_dir))
        return finish()

    bpe = prep.load_bpe(bpe_dir)                                   # regex module when importable
    bpe_re = prep.load_bpe(bpe_dir, use_regex_module=False)      # always the `re` fallback
    encode, how = prep.choose_encoder(bpe, "")
    print("prepare.py encoder: " + how + "; fallback pre-tokeniser: " + bpe_re.pretokenizer)

    # known encodings, with every encoder prepare.py may use
    encoders = [("bpe[" + bpe.pretokenizer + "]", bpe.encode)]
    if bpe_re.pretokenizer != bpe.pretokenizer:
        encoders.append(("bpe[" + bpe_re.pretokenizer + "]", bpe_re.encode))
    if encode != bpe.encode:
        encoders.append(("selected[" + how + "]", encode))
    for ename, enc in encoders:
        for text, ids in KNOWN:
            def known_ids():
                got = enc(text)
                return got == ids, ("{}".format(ids) if got == ids else "got {}, expected {}".format(got, ids))
            check("gpt2 ids {} {!r}".format(ename, text), known_ids)

    for text, pieces in PRETOKENIZE:
        for b in ((bpe, bpe_re) if bpe_re.pretokenizer != bpe.pretokenizer else (bpe,)):
            def split_ok():
                got = b.pretokenize(text)
                return got == pieces, ("" if got == pieces else "got {!r}, expected {!r}".format(got, pieces))
            check("pretokenize [{}] {!r}".format(b.pretokenizer, text), split_ok)

    if bpe_re.pretokenizer != bpe.pretokenizer:
        def same_split():
            cps = [c for c in range(0x110000) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
            # every assigned code point next to a letter, a digit, punctuation and spaces, so that a
            # character in the wrong class changes the split
            s = "".join("{0}!{0}a {0}1{0}{0}\n'{0}  {0}".format(chr(c)) for c in cps)
            a, b = bpe.pretokenize(s), bpe_re.pretokenize(s)
            if a != b:
                k = next(i for i in range(min(len(a), len(b))) if a[i] != b[i])
                return False, "first difference at piece {}: {!r} vs {!r}".format(k, a[k], b[k])
            with open(ts_path, encoding="utf-8") as f:
                t = f.read()
            if bpe.pretokenize(t) != bpe_re.pretokenize(t):
                return False, "tinyshakespeare splits differ"
            return True, "{} assigned code points, {} pieces".format(len(cps), len(a))
        check("fallback re pre-tokeniser equals the regex module's", same_split)
    else:
        skip("fallback re pre-tokeniser equals the regex module's", "the regex module is not importable here")

    tmp = tempfile.mkdtemp(prefix="test_data_")
    try:
        run_e2e(prep, bpe, encode, tmp, ts_path, bpe_dir)
        run_errors(tmp, ts_path, bpe_dir, shared)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return finish()


def run_e2e(prep, bpe, encode, tmp, ts_path, bpe_dir):
    out = os.path.join(tmp, "ts")
    tok_path = os.path.join(tmp, "gpt2_tokenizer.bin")
    rc, so, se, dt = run_prepare(["--input", ts_path, "--bpe-dir", bpe_dir, "--out-dir", out, "--tokenizer-out", tok_path])
    sys.stdout.write("".join("  | " + l + "\n" for l in so.splitlines()))
    if not check("prepare.py tinyshakespeare runs", lambda: (rc == 0, "exit {}, stderr {!r}".format(rc, se[-500:])) if rc != 0
                 else (True, "{:.2f} s".format(dt))):
        return
    val_path = os.path.join(out, "tiny_shakespeare_val.bin")
    train_path = os.path.join(out, "tiny_shakespeare_train.bin")
    shards = {}

    for split, path in (("val", val_path), ("train", train_path)):
        def shard_ok():
            header, tokens, size = read_shard(path)
            shards[split] = tokens
            if header[0] != 20240520 or header[1] != 1:
                return False, "magic/version {} {}".format(header[0], header[1])
            if any(header[3:]):
                return False, "header slots 3..255 not all zero"
            n = header[2]
            if size != 1024 + 2 * n:
                return False, "file is {} bytes, header says {} tokens ({} bytes)".format(size, n, 1024 + 2 * n)
            if n != len(tokens):
                return False, "count mismatch"
            if split == "val" and n != 32768:
                return False, "val has {} tokens, expected 32768".format(n)
            if split == "val" and tokens[0] != 50256:
                return False, "val starts with {}, expected 50256".format(tokens[0])
            if max(tokens) >= 50257:
                return False, "token {} >= 50257".format(max(tokens))
            return True, "{:,} tokens, {:,} bytes".format(n, size)
        check("shard {} header, size and tokens".format(split), shard_ok)
    if len(shards) != 2:
        return
    all_tokens = shards["val"] + shards["train"]
    print("INFO tinyshakespeare: {:,} tokens total ({:,} val + {:,} train)".format(
        len(all_tokens), len(shards["val"]), len(shards["train"])))

    with open(ts_path, "rb") as f:
        original = f.read()
    text = original.decode("utf-8")

    def recipe():
        # one EOT per "\n\n"-separated section, each right before its section
        n_eot = all_tokens.count(50256)
        expected = text.count("\n\n") + 1
        if n_eot != expected:
            return False, "{} EOT tokens, expected {} (sections)".format(n_eot, expected)
        sections = text.split("\n\n")
        direct = []
        for i, s in enumerate(sections):
            direct.append(50256)
            direct.extend(bpe.encode(s + ("\n\n" if i < len(sections) - 1 else "")))
        if direct != all_tokens:
            k = next((i for i in range(min(len(direct), len(all_tokens))) if direct[i] != all_tokens[i]), None)
            return False, "shards differ from a direct encoding (lengths {} vs {}, first difference {})".format(
                len(all_tokens), len(direct), k)
        return True, "{} sections".format(expected)
    check("shards follow the section recipe", recipe)

    def tokenizer_ok():
        header, pieces, left = read_tokenizer(tok_path)
        if header[0] != 20240328 or header[1] != 2 or header[2] != 50257 or header[3] != 50256 or any(header[4:]):
            return False, "header {}".format(header[:5])
        if left != 0:
            return False, "{} bytes after the last token".format(left)
        if len(pieces) != 50257:
            return False, "{} entries".format(len(pieces))
        want = {50256: b"<|endoftext|>", 0: b"!", 198: b"\n", 220: b" ", 262: b" the", 628: b"\n\n", 995: b" world"}
        for i, b in want.items():
            if pieces[i] != b:
                return False, "token {} is {!r}, expected {!r}".format(i, pieces[i], b)
        if len(set(pieces)) != 50257:
            return False, "token byte strings are not all distinct"
        singles = sorted(p for p in pieces if len(p) == 1)
        if singles != [bytes([b]) for b in range(256)]:
            return False, "the 256 single bytes are not all present"
        return True, "50,257 entries"
    if not check("tokenizer file header and entries", tokenizer_ok):
        return
    _, pieces, _ = read_tokenizer(tok_path)

    def round_trip_corpus():
        got = decode(pieces, [t for t in all_tokens if t != 50256])
        if got != original:
            k = next((i for i in range(min(len(got), len(original))) if got[i] != original[i]), min(len(got), len(original)))
            return False, "decoded {} bytes vs {} original, first difference at byte {}".format(len(got), len(original), k)
        return True, "{:,} bytes".format(len(got))
    check("round trip tinyshakespeare via the tokenizer file", round_trip_corpus)

    encoders = [("bpe", bpe.encode)] + ([("selected", encode)] if encode != bpe.encode else [])
    for ename, enc in encoders:
        def round_trip_text():
            ids = enc(ROUND_TRIP_TEXT)
            got = decode(pieces, ids)
            want = ROUND_TRIP_TEXT.encode("utf-8")
            if 50256 in ids:
                return False, "literal <|endoftext|> became the special token"
            return got == want, ("{} tokens".format(len(ids)) if got == want else "decoded {!r}".format(got))
        check("round trip unicode/emoji/whitespace text ({})".format(ename), round_trip_text)

    # the default layout, offline, with the downloads already cached: copy the script into a fake repo
    def cached_defaults():
        root = os.path.join(tmp, "fakerepo")
        script = os.path.join(root, "dev", "data", "prepare.py")
        os.makedirs(os.path.join(root, "dev", "data", "tinyshakespeare"))
        os.makedirs(os.path.join(root, "dev", "data", "gpt2"))
        shutil.copy(PREPARE, script)
        shutil.copy(ts_path, os.path.join(root, "dev", "data", "tinyshakespeare", "tiny_shakespeare.txt"))
        for name in ("encoder.json", "vocab.bpe"):
            shutil.copy(os.path.join(bpe_dir, name), os.path.join(root, "dev", "data", "gpt2", name))
        rc, so, se, _ = run_prepare(["--timeout", "5"], env=offline_env(), script=script)
        if rc != 0:
            return False, "exit {}: {!r}".format(rc, se[-300:])
        if "using cached" not in so:
            return False, "did not say it used the cached files: {!r}".format(so[-300:])
        d = os.path.join(root, "dev", "data")
        for a, b in ((os.path.join(d, "tinyshakespeare", "tiny_shakespeare_val.bin"), val_path),
                     (os.path.join(d, "tinyshakespeare", "tiny_shakespeare_train.bin"), train_path),
                     (os.path.join(d, "gpt2_tokenizer.bin"), tok_path)):
            with open(a, "rb") as fa, open(b, "rb") as fb:
                if fa.read() != fb.read():
                    return False, "{} differs from the explicit-path run".format(a)
        leftovers = [f for _, _, fs in os.walk(root) for f in fs if f.endswith(".tmp")]
        if leftovers:
            return False, "left temporary files {}".format(leftovers)
        return True, "same shards and tokenizer file"
    check("default paths with cached downloads (offline)", cached_defaults)


def run_errors(tmp, ts_path, bpe_dir, shared):
    # no --input and no network: the download fails fast with a clear message
    def offline_text():
        empty = os.path.join(tmp, "empty_out")
        os.makedirs(empty)
        rc, so, se, dt = run_prepare(["--out-dir", empty, "--bpe-dir", bpe_dir, "--tokenizer-out",
                                      os.path.join(tmp, "tk_offline.bin"), "--timeout", "5"], env=offline_env(), timeout=120)
        ok, detail = one_line_error(rc, se, ["cannot download", "--input"])
        if ok and dt > 30:
            return False, "took {:.1f} s".format(dt)
        if ok and os.listdir(empty):
            return False, "left files behind: {}".format(os.listdir(empty))
        return ok, detail + " [{:.1f} s]".format(dt)
    check("offline without --input exits 1 with a message", offline_text)

    def offline_bpe():
        root = os.path.join(tmp, "fakerepo2")
        script = os.path.join(root, "dev", "data", "prepare.py")
        os.makedirs(os.path.dirname(script))
        shutil.copy(PREPARE, script)
        rc, so, se, dt = run_prepare(["--input", ts_path, "--timeout", "5"], env=offline_env(), timeout=120, script=script)
        ok, detail = one_line_error(rc, se, ["cannot download", "--bpe-dir"])
        if ok and dt > 30:
            return False, "took {:.1f} s".format(dt)
        return ok, detail + " [{:.1f} s]".format(dt)
    check("offline without --bpe-dir exits 1 with a message", offline_bpe)

    def missing_input():
        rc, so, se, _ = run_prepare(["--input", os.path.join(tmp, "no_such_file.txt"), "--bpe-dir", bpe_dir,
                                     "--out-dir", os.path.join(tmp, "o1"), "--tokenizer-out", os.path.join(tmp, "t1.bin")])
        return one_line_error(rc, se, ["no_such_file.txt", "does not exist"])
    check("nonexistent --input exits 1 with a message", missing_input)

    def missing_bpe():
        rc, so, se, _ = run_prepare(["--input", ts_path, "--bpe-dir", os.path.join(tmp, "nobpe"),
                                     "--out-dir", os.path.join(tmp, "o2"), "--tokenizer-out", os.path.join(tmp, "t2.bin")])
        return one_line_error(rc, se, ["encoder.json"])
    check("missing BPE files exit 1 with a message", missing_bpe)

    def malformed_encoder():
        bad = os.path.join(tmp, "badbpe")
        os.makedirs(bad)
        shutil.copy(os.path.join(bpe_dir, "vocab.bpe"), os.path.join(bad, "vocab.bpe"))
        with open(os.path.join(bpe_dir, "encoder.json"), "rb") as f:
            data = f.read()
        with open(os.path.join(bad, "encoder.json"), "wb") as f:
            f.write(data[:len(data) // 2])
        rc, so, se, _ = run_prepare(["--input", ts_path, "--bpe-dir", bad,
                                     "--out-dir", os.path.join(tmp, "o3"), "--tokenizer-out", os.path.join(tmp, "t3.bin")])
        ok, detail = one_line_error(rc, se, ["malformed encoder.json"])
        if ok and os.path.exists(os.path.join(tmp, "t3.bin")):
            return False, "wrote a tokenizer file anyway"
        return ok, detail
    check("malformed encoder.json exits 1 with a message", malformed_encoder)

    def kjv_needs_input():
        rc, so, se, _ = run_prepare(["--dataset", "kjv", "--bpe-dir", bpe_dir, "--out-dir", os.path.join(tmp, "o4")])
        return one_line_error(rc, se, ["--input"])
    check("kjv without --input exits 1 with a message", kjv_needs_input)

    def text_needs_name():
        rc, so, se, _ = run_prepare(["--dataset", "text", "--input", ts_path, "--bpe-dir", bpe_dir,
                                     "--out-dir", os.path.join(tmp, "o5")])
        return one_line_error(rc, se, ["--name"])
    check("--dataset text without --name exits 1 with a message", text_needs_name)

    def text_dataset():
        small = os.path.join(tmp, "small.txt")
        with open(small, "w", encoding="utf-8") as f:
            f.write("One paragraph.\r\n\r\nAnother, \u00e9l\u00e8ve.\n\nLast.")
        out = os.path.join(tmp, "o6")
        rc, so, se, _ = run_prepare(["--dataset", "text", "--input", small, "--name", "mini", "--val-tokens", "3",
                                     "--bpe-dir", bpe_dir, "--out-dir", out, "--tokenizer-out", os.path.join(tmp, "t6.bin")])
        if rc != 0:
            return False, "exit {}: {!r}".format(rc, se[-300:])
        _, val, _ = read_shard(os.path.join(out, "mini_val.bin"))
        _, train, _ = read_shard(os.path.join(out, "mini_train.bin"))
        toks = val + train
        if len(val) != 3 or toks.count(50256) != 3 or toks[0] != 50256:
            return False, "val {} train {}".format(val, train)
        _, pieces, _ = read_tokenizer(os.path.join(tmp, "t6.bin"))
        got = decode(pieces, [t for t in toks if t != 50256])
        want = "One paragraph.\n\nAnother, \u00e9l\u00e8ve.\n\nLast.".encode("utf-8")
        return got == want, ("" if got == want else "decoded {!r}".format(got))
    check("--dataset text with CRLF input", text_dataset)


def finish():
    print("{} passed, {} failed, {} skipped".format(RESULTS["passed"], RESULTS["failed"], RESULTS["skipped"]))
    return 1 if RESULTS["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
