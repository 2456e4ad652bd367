"""The validation (and training) loss curves of several runs, from their main.log files.

    python3 scripts/plot_logs.py DIR RUN [RUN...]

reads DIR/RUN/main.log (llm.c's format: "s:<step> trl:<loss> ..." and "s:<step> tel:<val loss>")
for each RUN and writes DIR/val_loss.csv and DIR/train_loss.csv: a row per step, a column per
run, empty where a run logged nothing at that step. Where matplotlib is installed it also draws
both into DIR/val_loss.png; without it, it says so and the CSV files are the result.
Used by scripts/ablate.sh; works on any runs' output directories (llm.c's own main.log too).
"""
import os
import sys


def read_log(path):
    """{"trl": {step: loss}, "tel": {step: loss}} from one main.log"""
    curves = {"trl": {}, "tel": {}}
    with open(path) as f:
        for line in f:
            fields = line.split()
            if len(fields) < 2 or not fields[0].startswith("s:"):
                continue
            key, _, value = fields[1].partition(":")
            if key in curves:
                curves[key][int(fields[0][2:])] = float(value)
    return curves


def write_csv(path, runs, curves, key):
    steps = sorted({s for run in runs for s in curves[run][key]})
    with open(path, "w") as f:
        f.write(",".join(["step"] + runs) + "\n")
        for s in steps:
            row = [str(s)] + [repr(curves[run][key][s]) if s in curves[run][key] else "" for run in runs]
            f.write(",".join(row) + "\n")
    return len(steps)


def main():
    if len(sys.argv) < 3:
        sys.exit("usage: python3 scripts/plot_logs.py DIR RUN [RUN...]")
    out, runs = sys.argv[1], sys.argv[2:]
    curves = {}
    for run in runs:
        path = os.path.join(out, run, "main.log")
        if not os.path.isfile(path):
            sys.exit("error: %s: no such file (did the run %s start?)" % (path, run))
        curves[run] = read_log(path)
    rows = write_csv(os.path.join(out, "val_loss.csv"), runs, curves, "tel")
    write_csv(os.path.join(out, "train_loss.csv"), runs, curves, "trl")
    print("wrote %s/val_loss.csv (%d steps) and %s/train_loss.csv" % (out, rows, out))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plot drawn (the CSV files hold the curves)")
        return
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        for ax, key in ((ax_train, "trl"), (ax_val, "tel")):
            points = sorted(curves[run][key].items())
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], label=run, marker="." if key == "tel" else None)
    ax_train.set_title("training loss")
    ax_val.set_title("validation loss")
    for ax in (ax_train, ax_val):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "val_loss.png"), dpi=120)
    print("wrote %s/val_loss.png" % out)


if __name__ == "__main__":
    main()
