rule train:
    input:
        data=get_dataset_file,
    output:
        model=f"{RUN_DIR}/model.pt",
        history=f"{RUN_DIR}/history.csv",
        record=f"{RUN_DIR}/run.json",
    log:
        "logs/train/{study}/{norm}/n{depth}_b{batch_size}/seed{seed}.log",
    benchmark:
        "results/benchmarks/train/{study}/{norm}/n{depth}_b{batch_size}/seed{seed}.tsv"
    conda:
        "../envs/normres.yaml"
    threads: 1
    resources:
        gpu=train_gpus(),
    params:
        settings=get_run_settings,
    script:
        "../scripts/train.py"
