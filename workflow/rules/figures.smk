rule figures:
    input:
        runs="results/runs.csv",
        summary="results/summary.csv",
        histories="results/histories.csv",
    output:
        expand("results/figures/{name}.png", name=figure_names(config["studies"])),
    log:
        "logs/figures/figures.log",
    conda:
        "../envs/normres.yaml"
    script:
        "../scripts/figures.py"


rule misclassified:
    input:
        unpack(get_misclassified_inputs),
    output:
        "results/figures/misclassified/{study}/{norm}_n{depth}_b{batch_size}.png",
    log:
        "logs/figures/misclassified/{study}/{norm}_n{depth}_b{batch_size}.log",
    conda:
        "../envs/normres.yaml"
    script:
        "../scripts/misclassified.py"
