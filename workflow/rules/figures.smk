rule figures:
    input:
        runs="results/runs.csv",
        summary="results/summary.csv",
        histories="results/histories.csv",
        robustness="results/robustness.csv",
        comparisons="results/comparisons.csv",
    output:
        figure_outputs(),
    log:
        "logs/figures/figures.log",
    conda:
        "../envs/normres.yaml"
    params:
        figures=[(f.name, study, path) for f, study, path in figure_files()],
        norm_order=list(CONFIG.norms),
    script:
        "../scripts/figures.py"


rule misclassified:
    input:
        unpack(get_misclassified_inputs),
    output:
        report(
            "results/figures/misclassified/{study}/{norm}_n{depth}_b{batch_size}.png",
            caption=caption_path("misclassified.rst"),
            category="{study}",
            subcategory="misclassified images",
            labels={
                "norm": "{norm}",
                "depth": "{depth}",
                "batch size": "{batch_size}",
            },
        ),
    log:
        "logs/figures/misclassified/{study}/{norm}_n{depth}_b{batch_size}.log",
    conda:
        "../envs/normres.yaml"
    script:
        "../scripts/misclassified.py"
