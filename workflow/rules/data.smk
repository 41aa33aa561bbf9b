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
        download=config["data"]["download"],
    script:
        "../scripts/prepare_data.py"
