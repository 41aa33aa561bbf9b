rule aggregate:
    input:
        records=get_run_files("run.json"),
        metrics=get_run_files("metrics.csv"),
        histories=get_run_files("history.csv"),
    output:
        runs="results/runs.csv",
        summary="results/summary.csv",
        histories="results/histories.csv",
    log:
        "logs/aggregate.log",
    conda:
        "../envs/normres.yaml"
    script:
        "../scripts/aggregate.py"
