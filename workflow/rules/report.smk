rule report:
    input:
        runs="results/runs.csv",
        summary="results/summary.csv",
        records=get_run_files("run.json"),
        figures=get_figures,
    output:
        "results/report.html",
    log:
        "logs/report.log",
    params:
        studies=config["studies"],
    conda:
        "../envs/normres.yaml"
    script:
        "../scripts/report.py"
