rule prepare_data:
    output:
        "resources/{dataset}/data.pt",
    log:
        "logs/prepare_data/{dataset}.log",
    conda:
        "../envs/normres.yaml"
    params:
        root=get_raw_root,
        mirrors=get_data_mirrors,
        download=CONFIG.data["download"],
    script:
        "../scripts/prepare_data.py"


rule corrupt:
    input:
        "resources/{dataset}/data.pt",
    output:
        "resources/{dataset}/corrupted.pt",
    log:
        "logs/corrupt/{dataset}.log",
    benchmark:
        "results/benchmarks/corrupt/{dataset}.tsv"
    conda:
        "../envs/normres.yaml"
    threads: 2
    params:
        images=get_corrupted_images,
    script:
        "../scripts/corrupt.py"
