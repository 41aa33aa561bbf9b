rule report:
    input:
        runs="results/runs.csv",
        summary="results/summary.csv",
        comparisons="results/comparisons.csv",
        records=get_run_files("run.json"),
        figures=get_figures,
    output:
        "results/report.html",
    log:
        "logs/report.log",
    conda:
        "../envs/normres.yaml"
    params:
        config=CONFIG.raw,
        norms=get_norm_descriptions(),
    script:
        "../scripts/report.py"
