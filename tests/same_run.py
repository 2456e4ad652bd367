"""Compares what two training runs printed: tests/same_run.py NAME LOG_A LOG_B [TOLERANCE]
(tests/same_run.py --options STATES prints the options of the runs it is used on, for the test
model and shard in the folder STATES: 4 steps of 2 micro-batches, Drop-Upcycling, aux and z losses)

The step lines ("step 3/4 | loss 4.6 | aux 2.15 z 8.6 | norm 0.78 | lr ...") and validation lines
("step 4 | val loss 4.57") of both logs must be the same steps, with loss, aux, z, norm, lr and
validation loss equal to TOLERANCE relative (default 1e-5) plus one unit of the last digit printed
(each log rounds to its own digits). Prints one PASS or FAIL line named NAME. Used by
tests/emu/run.sh (emulated) and tests/gpu_tests.sh (on a GPU) to hold the GPU engine's own
training loop (train_moe's main, FP32) to the CPU twin's: the same data, schedule, upcycling and
updates, step after step.
"""
import re
import sys

NUMBER = r"(-?[0-9]+\.?[0-9]*(?:e[-+]?[0-9]+)?)"
STEP = re.compile(r"^step +([0-9]+)/([0-9]+) \| loss " + NUMBER + r"(?: \| aux " + NUMBER + " z " + NUMBER + r")? \| norm "
                  + NUMBER + r" \| lr " + NUMBER)
VAL = re.compile(r"^step ([0-9]+) \| val loss " + NUMBER)


def values(path):
    """[(label, number as printed)] in the order printed"""
    out = []
    with open(path) as f:
        for line in f:
            m = STEP.match(line)
            if m:
                step = m.group(1)
                for label, text in zip(("loss", "aux", "z", "norm", "lr"), m.groups()[2:]):
                    if text is not None:
                        out.append(("step %s %s" % (step, label), text))
                continue
            m = VAL.match(line)
            if m:
                out.append(("step %s val loss" % m.group(1), m.group(2)))
    return out


def unit(text):
    """one unit of the last digit printed: 0.0001 for 4.5123, 1e-06 for 3.00e-04"""
    mantissa, _, exponent = text.lower().partition("e")
    digits = len(mantissa.partition(".")[2])
    return 10.0 ** (-digits + (int(exponent) if exponent else 0))


def options(states):
    return ("-m {0}/dense.bin -i {0}/shard.bin -j {0}/shard.bin -b 4 -t 16 -d 128 -x 4 -l 1e-3 -s 0 -v 2 --val-steps 2 "
            "--stats-every 0 -e 8 -k 2 --init drop --z-loss 0.001".format(states))


def main():
    if sys.argv[1] == "--options":
        print(options(sys.argv[2]))
        return 0
    name, log_a, log_b = sys.argv[1:4]
    tolerance = float(sys.argv[4]) if len(sys.argv) > 4 else 1e-5
    a, b = values(log_a), values(log_b)
    if not a or [label for label, _ in a] != [label for label, _ in b]:
        print("FAIL %s: the logs print different steps (%d and %d values)" % (name, len(a), len(b)))
        return 1
    worst, where = 0.0, ""
    for (label, x), (_, y) in zip(a, b):
        allowed = tolerance * abs(float(y)) + max(unit(x), unit(y))
        excess = abs(float(x) - float(y)) / allowed
        if excess > worst:
            worst, where = excess, "%s: %s vs %s" % (label, x, y)
    if worst > 1.0:
        print("FAIL %s: %s differs by %.1f times what is allowed" % (name, where, worst))
        return 1
    steps = len({label.split()[1] for label, _ in a})
    print("PASS %s: %d values over %d steps equal to %g relative plus the last digit printed (closest to the limit: %s)"
          % (name, len(a), steps, tolerance, where or "all identical"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
