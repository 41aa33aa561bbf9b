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
    conda:
        "../envs/normres.yaml"
    params:
        studies=config["studies"],
    script:
        "../scripts/report.py"
