rule study_figures:
    input:
        runs="results/runs.csv",
        summary="results/summary.csv",
        histories="results/histories.csv",
    output:
        **{name: f"results/figures/{{study}}/{name}.png" for name in STUDY_FIGURES},
    log:
        "logs/figures/{study}.log",
    conda:
        "../envs/normres.yaml"
    script:
        "../scripts/study_figures.py"


rule misclassified:
    input:
        unpack(get_misclassified_inputs),
    output:
        "results/figures/{study}/misclassified/{norm}_n{depth}_b{batch_size}.png",
    log:
        "logs/figures/{study}/misclassified/{norm}_n{depth}_b{batch_size}.log",
    conda:
        "../envs/normres.yaml"
    script:
        "../scripts/misclassified.py"


rule final_accuracy:
    input:
        summary="results/summary.csv",
    output:
        "results/figures/final_accuracy.png",
    log:
        "logs/figures/final_accuracy.log",
    conda:
        "../envs/normres.yaml"
    script:
        "../scripts/final_accuracy.py"
