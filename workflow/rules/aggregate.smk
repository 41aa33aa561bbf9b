rule aggregate:
    input:
        records=get_run_files("run.json"),
        metrics=get_run_files("metrics.csv"),
        histories=get_run_files("history.csv"),
        robustness=get_robustness_files,
    output:
        runs=report(
            "results/runs.csv",
            caption=caption_path("runs.rst"),
            category="tables",
            labels={"table": "runs"},
        ),
        summary=report(
            "results/summary.csv",
            caption=caption_path("summary.rst"),
            category="tables",
            labels={"table": "summary"},
        ),
        histories="results/histories.csv",
        robustness="results/robustness.csv",
    log:
        "logs/aggregate.log",
    conda:
        "../envs/normres.yaml"
    script:
        "../scripts/aggregate.py"


rule compare:
    input:
        runs="results/runs.csv",
    output:
        report(
            "results/comparisons.csv",
            caption=caption_path("comparisons_table.rst"),
            category="tables",
            labels={"table": "comparisons"},
        ),
    log:
        "logs/compare.log",
    conda:
        "../envs/normres.yaml"
    params:
        references=get_references(),
        norm_order=list(CONFIG.norms),
    script:
        "../scripts/compare.py"
