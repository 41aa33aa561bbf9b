rule prepare_data:
    output:
        "resources/{dataset}/data.pt",
    log:
        "logs/prepare_data/{dataset}.log",
    params:
        root=get_raw_root,
        mirrors=get_data_mirrors,
        download=config["data"]["download"],
    conda:
        "../envs/normres.yaml"
    script:
        "../scripts/prepare_data.py"
