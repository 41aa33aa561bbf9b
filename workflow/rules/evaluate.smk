rule test:
    input:
        model=f"{RUN_DIR}/model.pt",
        record=f"{RUN_DIR}/run.json",
        data=get_dataset_file,
    output:
        predictions=f"{RUN_DIR}/predictions.csv",
        metrics=f"{RUN_DIR}/metrics.csv",
    log:
        "logs/test/{study}/{norm}/n{depth}_b{batch_size}/seed{seed}.log",
    conda:
        "../envs/normres.yaml"
    threads: 1
    script:
        "../scripts/test.py"
