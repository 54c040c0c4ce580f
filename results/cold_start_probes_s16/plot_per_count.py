import pandas as pd, matplotlib
matplotlib.use("Agg"); import matplotlib.pyplot as plt
labels={"cold_start":"make run's (lr 3e-3, shift 1, seed 0)","seed1":"same, seed 1","shift3":"training shift 3","shift05":"training shift 0.5","cw1":"count_weight_power 1","lr15":"lr 1.5e-3"}
fig,ax=plt.subplots(figsize=(7.5,4))
done=set()
for f in ["val_shift3","val_cw1_lr15","val_shift05_seed1"]:
    d=pd.read_csv(f+"_per_count.csv"); d=d[d["count"].astype(str)!="all"]; x=d["count"].astype(int)
    for st in [c[:-9] for c in d.columns if c.endswith("_accuracy")]:
        if st in done: continue
        done.add(st)
        ax.plot(x,d[st+"_accuracy"],marker="o",lw=2.5 if st=="cold_start" else 1.2,color="k" if st=="cold_start" else None,label=labels[st])
ax.set_xlabel("requested count"); ax.set_ylabel("exact-count accuracy (84 val images each)"); ax.set_xticks(range(1,11))
ax.set_title("2,000-step cold starts, 840 val images, CFG 2"); ax.legend(fontsize=8); ax.grid(alpha=.3)
fig.tight_layout(); fig.savefig("val_per_count.png",dpi=120)
