rule test:
    input:
        model=f"{RUN_DIR}/model.pt",
        data=get_dataset_file,
    output:
        predictions=f"{RUN_DIR}/predictions.csv",
        metrics=f"{RUN_DIR}/metrics.csv",
    log:
        "logs/test/{study}/{norm}/n{depth}_b{batch_size}/seed{seed}.log",
    conda:
        "../envs/normres.yaml"
    threads: 1
    params:
        settings=get_run_settings,
        bn_statistics=get_bn_statistics,
    script:
        "../scripts/test.py"


rule robustness:
    input:
        model=f"{RUN_DIR}/model.pt",
        data=get_dataset_file,
        corrupted=get_corrupted_file,
    output:
        f"{RUN_DIR}/robustness.csv",
    log:
        "logs/robustness/{study}/{norm}/n{depth}_b{batch_size}/seed{seed}.log",
    conda:
        "../envs/normres.yaml"
    threads: 1
    params:
        settings=get_run_settings,
        robustness=get_robustness,
    script:
        "../scripts/robustness.py"
